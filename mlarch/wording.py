"""Errors whose fix names an argument, worded for whoever called: a Python caller reads the
argument (`k=0.05`, `langs=['en', 'de']`), the CLI its flag (`--k 0.05`, `--langs en,de`).

    raise wording.error(UsageError, Arg("by"), f" must be one of layer, global, got {by!r}")

str(exc) is the Python wording; exc.cli_message the CLI's, which the CLI prints instead.
The error keeps its class (UsageError: exit 2, MlarchError: exit 1), so callers catch it as
before. A part that is not an argument but still differs (a CLI command, `--max-length none`)
is a Phrase: `Phrase("see Archive.evaluations()", "see `mlarch evals`")`."""

from __future__ import annotations

_BARE = object()


class Phrase:
    """A part of a message worded differently for each audience: `python` text or `cli` text."""

    def __init__(self, python: str, cli: str):
        self._python, self._cli = python, cli

    def python(self) -> str:
        """The words a Python caller reads."""
        return self._python

    def cli(self) -> str:
        """The words the CLI prints."""
        return self._cli


class Arg(Phrase):
    """One argument in a message: `name=` (Python) or `--name` (CLI), with an optional example
    value: `name=<repr>` or `--name <value>` (a list comma-joined, as the CLI takes it; True: the
    bare flag, `force=True` or `--force`).
    shown: the value as both wordings write it (`--template 'x'`, `template='x'`), e.g. the
    repr of a value the caller gave."""

    def __init__(self, name: str, example=_BARE, flag: str | None = None, *, shown: str | None = None):
        self.name, self.example, self.shown = name, example, shown
        self.flag = flag or "--" + name.replace("_", "-")

    def python(self) -> str:
        """The Python wording: `name=` or `name=<repr of the example>`."""
        if self.shown is not None:
            return f"{self.name}={self.shown}"
        return f"{self.name}=" if self.example is _BARE else f"{self.name}={self.example!r}"

    def cli(self) -> str:
        """The CLI wording: `--flag` or `--flag <example>`."""
        if self.shown is not None:
            return f"{self.flag} {self.shown}"
        if self.example is _BARE or self.example is True:  # True: an on/off flag (--force)
            return self.flag
        value = ",".join(map(str, self.example)) if isinstance(self.example, (list, tuple)) else str(self.example)
        return f"{self.flag} {value}"


def brief(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a message shows what was passed, not all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error(kind: type[Exception], *parts) -> Exception:
    """An instance of `kind` (an mlarch error class) whose message is `parts` joined, each Arg
    (or Phrase) in its Python wording; `cli_message` holds the same text with CLI flags."""
    exc = kind(python(*parts))
    exc.cli_message = cli(*parts)
    return exc


def python(*parts) -> str:
    """`parts` joined, each Arg or Phrase in its Python wording."""
    return "".join(p.python() if isinstance(p, Phrase) else str(p) for p in parts)


def cli(*parts) -> str:
    """`parts` joined, each Arg or Phrase in its CLI wording."""
    return "".join(p.cli() if isinstance(p, Phrase) else str(p) for p in parts)


def for_reporter(reporter, *parts) -> str:
    """`parts` joined in the wording of whoever reads `reporter`: the CLI's where the reporter
    says `cli = True` (the CLI's progress bar), else the Python caller's."""
    return cli(*parts) if getattr(reporter, "cli", False) else python(*parts)


def for_cli(exc: BaseException) -> str:
    """The message of `exc` as the CLI prints it (its CLI wording where it has one)."""
    return getattr(exc, "cli_message", None) or str(exc)
