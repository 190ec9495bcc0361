"""mlarch: a reproducible result archive for mechanistic analyses of LLMs."""

__version__ = "0.1.0"  # the single source: pyproject.toml reads it (importlib.metadata costs ~30 ms)


def open(path=None):  # noqa: A001 - mirrors sqlite_utils.Database / zarr.open
    """Open the archive folder at `path` ($MLARCH_ARCHIVE, else ./mlarch-archive).

    Opening creates nothing: reading a path that holds no archive raises an error, and
    `Archive.ingest` (or `mlarch import-bundle`) creates the archive on first use.
    """
    from mlarch.archive import Archive

    return Archive(path)


def __getattr__(name):
    # `mlarch.Archive` (mlarch.archive.Archive: reading, from mlarch.query.api, plus ingest,
    # evaluate, charts...) on first use: importing it loads DuckDB and polars (~0.3 s), which
    # `import mlarch` (and the CLI's --help) should not pay.
    if name == "Archive":
        from mlarch.archive import Archive

        return Archive
    raise AttributeError(f"module 'mlarch' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "Archive"])


__all__ = ["Archive", "__version__", "open"]
