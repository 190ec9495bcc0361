"""Progress of ingest and eval: a rich progress bar (samples, tokens/s per language and role)
on stderr in a terminal, and as live output in a Jupyter notebook (rich renders there too).

The CLI shows it unless --quiet; `Archive.ingest` / `Archive.evaluate` show it when the
session is interactive (a terminal or a notebook) and stay quiet otherwise (scripts, CI,
logs), unless told with progress=True / False.
"""

from __future__ import annotations

import time


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _live_possible(console) -> bool:
    """rich redraws a bar in a notebook through ipywidgets only (else it warns on every update)."""
    if not console.is_jupyter:
        return True
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def interactive() -> bool:
    """True in a terminal (stderr is a TTY) or a Jupyter notebook."""
    console = _console()
    return bool(console.is_jupyter or console.is_terminal)


class RichReporter:
    """A Reporter (mlarch.ingest.pipeline.Reporter) that draws a rich progress bar."""

    def __init__(self, quiet: bool = False, cli: bool = False):
        self.console = _console()
        self.quiet = quiet
        self.cli = cli  # its messages name CLI flags (--force), else Python arguments (force=True)
        self.progress = None
        self.task = None
        self.tokens = 0
        self.started = 0.0
        # a notebook without ipywidgets: one line per pass when it ends instead of a live bar
        self.live = _live_possible(self.console)
        self.label, self.total, self.done, self.unit = "", 0, 0, "samples"

    def message(self, text: str) -> None:
        """Print one line of status (nothing when quiet)."""
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def start_pass(self, label: str, total: int, unit: str = "samples") -> None:
        """Begin a scoring pass of `total` samples (or other `unit`s: a Ray ingest counts units): a live bar where
        interactive, else a line at its end."""
        if self.quiet:
            return
        self.label, self.total, self.done, self.unit = label, total, 0, unit
        self.tokens, self.started = 0, time.perf_counter()
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]} · {task.fields[rate]} tok/s"), TimeElapsedColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(label, total=total, rate="-", unit=unit)

    def _rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def advance(self, samples: int, tokens: int) -> None:
        """Count `samples` more samples and `tokens` more tokens of the current pass (the bar shows tokens per
        second)."""
        if self.quiet:
            return
        self.tokens += tokens
        self.done += samples
        if self.progress is not None:
            self.progress.update(self.task, advance=samples, rate=f"{self._rate():,.0f}")

    def end_pass(self) -> None:
        """Finish the current pass: stop its bar, or print its one-line summary (samples, tokens per second, seconds)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        elif not self.quiet and not self.live and self.label:
            self.message(f"{self.label}: {self.done}/{self.total} {self.unit} · {self._rate():,.0f} tok/s · "
                         f"{time.perf_counter() - self.started:.1f} s")
        self.label = ""


def reporter_for(progress: bool | None = None, reporter=None):
    """The reporter an API call uses: `reporter` if given, else a progress bar when
    `progress` is True (None: when the session is interactive), else None (quiet)."""
    if reporter is not None:
        return reporter
    if progress is None:
        progress = interactive()
    return RichReporter() if progress else None
