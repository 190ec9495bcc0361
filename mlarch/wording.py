"""Errors whose fix names an argument, worded for whoever called: a Python caller reads the
argument (`k=0.05`, `langs=['en', 'de']`), the CLI its flag (`--k 0.05`, `--langs en,de`).

    raise wording.error(UsageError, Arg("by"), f" must be one of layer, global, got {by!r}")

str(exc) is the Python wording; exc.cli_message the CLI's, which the CLI prints instead.
The error keeps its class (UsageError: exit 2, MlarchError: exit 1), so callers catch it as
before."""

from __future__ import annotations

_BARE = object()


class Arg:
    """One argument in a message: `name=` (Python) or `--name` (CLI), with an optional example
    value: `name=<repr>` or `--name <value>` (a list comma-joined, as the CLI takes it)."""

    def __init__(self, name: str, example=_BARE, flag: str | None = None):
        self.name, self.example = name, example
        self.flag = flag or "--" + name.replace("_", "-")

    def python(self) -> str:
        """The Python wording: `name=` or `name=<repr of the example>`."""
        return f"{self.name}=" if self.example is _BARE else f"{self.name}={self.example!r}"

    def cli(self) -> str:
        """The CLI wording: `--flag` or `--flag <example>`."""
        if self.example is _BARE:
            return self.flag
        value = ",".join(map(str, self.example)) if isinstance(self.example, (list, tuple)) else str(self.example)
        return f"{self.flag} {value}"


def error(kind: type[Exception], *parts) -> Exception:
    """An instance of `kind` (an mlarch error class) whose message is `parts` joined, each Arg
    in its Python wording; `cli_message` holds the same text with CLI flags."""
    exc = kind("".join(p.python() if isinstance(p, Arg) else str(p) for p in parts))
    exc.cli_message = "".join(p.cli() if isinstance(p, Arg) else str(p) for p in parts)
    return exc


def for_cli(exc: BaseException) -> str:
    """The message of `exc` as the CLI prints it (its CLI wording where it has one)."""
    return getattr(exc, "cli_message", None) or str(exc)
