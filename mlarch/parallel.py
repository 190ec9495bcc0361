"""Thread pools for array work: numpy releases the GIL in partitions, compares and bit
operations, and blosc and hashlib release it too, so threads use every core."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pool(limit: int = 4) -> ThreadPoolExecutor:
    """Up to `limit` threads (one per core): each holds one module's or one range's
    temporaries, so a few threads keep memory bounded on large models."""
    return ThreadPoolExecutor(max(1, min(limit, cores())))
