"""A rich progress bar on stderr for ingest: samples, tokens/s, per language and role."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RichReporter:
    def __init__(self, quiet: bool = False):
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.progress = None
        self.task = None
        self.tokens = 0
        self.started = 0.0

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def start_pass(self, label: str, total: int) -> None:
        if self.quiet:
            return
        self.progress = Progress(
            TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("samples · {task.fields[rate]} tok/s"), TimeElapsedColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(label, total=total, rate="-")
        self.tokens, self.started = 0, time.perf_counter()

    def advance(self, samples: int, tokens: int) -> None:
        if self.progress is None:
            return
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=samples, rate=f"{rate:,.0f}")

    def end_pass(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
