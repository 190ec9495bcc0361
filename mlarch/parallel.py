"""Thread pools for array work: numpy releases the GIL in partitions, compares and bit
operations, and blosc and hashlib release it too, so threads use every core."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pool(limit: int = 4) -> ThreadPoolExecutor:
    """Up to `limit` threads (one per core the process may use, which on a shared or
    containerised host is fewer than os.cpu_count()). The default cap of 4 is for work whose
    threads each hold a whole module's temporaries (selection: several bytes per parameter of
    the largest module each), so more cores would raise peak memory, not only speed; work
    whose per-thread memory is a bounded range (derive) passes a higher limit."""
    return ThreadPoolExecutor(max(1, min(limit, cores())))


class Inline:
    """The executor interface, each task run at once in the caller's thread: its error is
    kept in the future (as a worker thread's would be); an interrupt is not."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Run `fn(*args, **kwargs)` now; returns a finished Future holding its result or its exception."""
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - raised by future.result(), as with a thread
            future.set_exception(exc)
        return future

    def __enter__(self) -> "Inline":
        return self

    def __exit__(self, *exc) -> bool:
        return False


def background(overlap: bool) -> ThreadPoolExecutor | Inline:
    """One worker thread that runs tasks in order beside the caller, or Inline where
    overlapping would only compete for the caller's cores."""
    return ThreadPoolExecutor(1) if overlap else Inline()
