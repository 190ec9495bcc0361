"""The CLI's progress bar: the library's (mlarch.progress), so notebooks get the same one."""

from mlarch.progress import RichReporter

__all__ = ["RichReporter"]
