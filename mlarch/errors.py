"""Errors the CLI turns into one-line messages (no traceback)."""


class MlarchError(Exception):
    """A problem with the archive, the data or the environment: exit status 1."""

    exit_code = 1


class UsageError(MlarchError):
    """A bad value on the command line or in an API call: exit status 2."""

    exit_code = 2
