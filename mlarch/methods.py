"""Scoring methods by name, and what each allows afterwards (torch-free: the query side reads it).

* ``mathneuro`` - the exact method: |W| * (sum of per-sample norms); an archive keeps both
  factors, so a run's sets at any k can be recomputed without the model.
* ``mathneuro-bf16`` - the authors' bf16 arithmetic (mlarch/ingest/mathneuro.py): its scores are
  not |W| x a norm vector and are not archived, so a run has sets only at the k it archived.
"""

from __future__ import annotations

from typing import Sequence

from mlarch.errors import UsageError
from mlarch.wording import Arg, error

EXACT = "mathneuro"
BF16 = "mathneuro-bf16"
METHODS = (EXACT, BF16)

# What `--paper-compat` expands to: the authors' pipeline (issue 15, points 1-4): their bf16
# arithmetic on one unpadded sample per forward, their pandas draw (shuffle seed: their
# `--random_state 1`; sample seeds 1, 101, 201), their texts, no truncation.
PAPER_COMPAT = {
    "method": BF16,
    "dtype": "bfloat16",
    "batch_size": 1,
    "sampling": "pandas",
    "shuffle_seed": 1,
    "template": "paper",
    "max_length": None,
}


def check_method(method: str) -> None:
    """Refuse a scoring method that is not one of METHODS (a UsageError)."""
    if method not in METHODS:
        raise error(UsageError, Arg("method", shown=repr(method)), f" is not known: use one of {', '.join(METHODS)}")


def rethresholdable(method: str) -> bool:
    """Whether a run's sets at a new k follow from its archived factors (|W| and norms)."""
    return method != BF16


def authors_count(n: int, k: float) -> int:
    """The authors' set size, int(num_params * keep_ratio) in floating point (mathneuro-bf16's);
    the exact method's is selection.top_count (the decimal k as written)."""
    return int(n * float(k))


def check_rethreshold(run_id: str, method: str, k: float, archived_ks: Sequence[float]) -> None:
    """Refuse a k that a mathneuro-bf16 run did not archive (its bf16 scores are not kept)."""
    if rethresholdable(method) or any(float(k) == float(a) for a in archived_ks):
        return
    have = ", ".join(f"{float(a):g}" for a in archived_ks) or "none"
    raise error(
        UsageError, f"run {run_id} used ", Arg("method", BF16), ", whose bf16 scores are not |W| x norms and are not "
        f"archived, so it has sets only at the k it archived ({have}), not at {float(k):g}: pick one of those, "
        "or ingest again with ", Arg("top_k"), f" including {float(k):g}"
    )
