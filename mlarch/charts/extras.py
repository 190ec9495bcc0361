"""The chart extras (altair, vl_convert), imported on first use with an install hint.

Its own module so that the chart kinds (kinds.py) and the package's save/render functions
(charts/__init__.py) share it without importing each other.
"""

from __future__ import annotations

from mlarch.errors import MlarchError


def require(module: str):
    """Import altair or vl_convert, or say how to install them (they are the chart extras)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MlarchError(f"charts need {module}: pip install 'altair>=5.4' 'vl-convert-python>=1.7'") from None
