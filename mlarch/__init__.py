"""mlarch: a reproducible result archive for mechanistic analyses of LLMs."""

__version__ = "0.1.0"  # the single source: pyproject.toml reads it (importlib.metadata costs ~30 ms)


def open(path=None):  # noqa: A001 - mirrors sqlite_utils.Database / zarr.open
    """Open the archive folder at `path` ($MLARCH_ARCHIVE, else ./mlarch-archive).

    Opening creates nothing: reading a path that holds no archive raises an error, and
    `Archive.ingest` (or `mlarch import-bundle`) creates the archive on first use.
    """
    from mlarch.query.api import Archive

    return Archive(path)


__all__ = ["__version__", "open"]
