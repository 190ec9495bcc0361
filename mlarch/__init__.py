"""mlarch: a reproducible result archive for mechanistic analyses of LLMs."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mlarch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def open(path=None):  # noqa: A001 - mirrors sqlite_utils.Database / zarr.open
    """Open (creating on first use) the archive folder at `path`.

    `path` defaults to $MLARCH_ARCHIVE, else ./mlarch-archive.
    """
    from mlarch.query.api import Archive

    return Archive(path)


__all__ = ["__version__", "open"]
