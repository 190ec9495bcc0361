"""Which items a run scores: mlarch's draw, or the MathNeuro authors' pandas draw.

* ``numpy`` (mlarch's): ``numpy.random.default_rng(seed).integers(0, n_items, n_samples)``.
* ``pandas`` (the authors', MathNeuroFast.py): the data frame read from the file is shuffled
  once, ``df = df.sample(frac=1, random_state=shuffle_seed)``, then each run draws
  ``df.sample(n=n_samples, replace=True, random_state=seed)``; the items scored are the drawn
  rows' original positions in the file, in draw order. (Their seeds: shuffle 1, samples
  1, 101, 201, i.e. ``--random_state 1`` plus 100 per repeat.)

pandas does that with numpy's legacy generator: an integer random_state becomes
``numpy.random.RandomState(seed)`` and ``sample`` takes
``RandomState.choice(n_rows, size, replace)`` positions (frac=1: size = round(1 * n_rows),
without replacement: a permutation). That is reproduced here with numpy alone, so pandas is
not needed at run time; tests/test_paper_sampling.py checks it against pandas itself.
"""

from __future__ import annotations

import numpy as np

from mlarch.errors import UsageError
from mlarch.wording import Arg, error

SAMPLINGS = ("numpy", "pandas")
_RANDOM_STATE_MAX = 2**32 - 1  # numpy.random.RandomState's seed range

DESCRIPTIONS = {
    "numpy": "numpy.random.default_rng(seed).integers(0, n_items, n_samples) (with replacement)",
    "pandas": "pandas: df.sample(frac=1, random_state=shuffle_seed).sample(n=n_samples, replace=True, "
              "random_state=seed); items are the drawn rows' file positions (numpy RandomState, as pandas)",
}


def check_sampling(sampling: str, seeds, shuffle_seed: int | None) -> None:
    """Bad options, before any work: an unknown sampling, or seeds RandomState cannot take."""
    if sampling not in SAMPLINGS:
        raise _unknown(sampling)
    if sampling != "pandas":
        return
    if shuffle_seed is None:
        raise error(UsageError, Arg("sampling", "pandas"), " needs ", Arg("shuffle_seed", shown="N"),
                    " (the authors': 1)")
    for name, value in [("shuffle_seed", shuffle_seed)] + [("seeds", s) for s in seeds]:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= _RANDOM_STATE_MAX:
            raise error(
                UsageError, Arg(name, shown=repr(value)), " is out of range for ", Arg("sampling", "pandas"),
                f": pandas seeds numpy's RandomState, which takes integers 0 to {_RANDOM_STATE_MAX}"
            )


def _unknown(sampling) -> UsageError:
    return error(UsageError, Arg("sampling", shown=repr(sampling)), f" is not known: use one of {', '.join(SAMPLINGS)}")


def pandas_shuffle(n_items: int, shuffle_seed: int) -> np.ndarray:
    """File positions in the order of ``df.sample(frac=1, random_state=shuffle_seed)``."""
    return np.random.RandomState(shuffle_seed).choice(n_items, size=round(1 * n_items), replace=False)


def pandas_draw(n_items: int, n_samples: int, seed: int, shuffle_seed: int) -> np.ndarray:
    """File positions of ``df.sample(frac=1, random_state=shuffle_seed)
    .sample(n=n_samples, replace=True, random_state=seed)``, in draw order."""
    if n_items < 1:
        raise UsageError("cannot draw samples from an empty data set: add items")
    order = pandas_shuffle(n_items, shuffle_seed)
    positions = np.random.RandomState(seed).choice(n_items, size=n_samples, replace=True)
    return order[positions].astype(np.int64)


def numpy_draw(n_items: int, n_samples: int, seed: int) -> np.ndarray:
    """mlarch's draw (the exact method's, unchanged)."""
    return np.random.default_rng(seed).integers(0, n_items, size=n_samples)


def draw(sampling: str, n_items: int, n_samples: int, seed: int, shuffle_seed: int | None = None) -> np.ndarray:
    """Item indices (0 .. n_items-1) of one run, with replacement, in draw order."""
    if sampling == "numpy":
        return numpy_draw(n_items, n_samples, seed)
    if sampling == "pandas":
        check_sampling(sampling, [seed], shuffle_seed)
        return pandas_draw(n_items, n_samples, seed, shuffle_seed)
    raise _unknown(sampling)


def describe(sampling: str, shuffle_seed: int | None = None) -> dict:
    """The provenance record of a draw."""
    record = {"sampling": sampling, "rule": DESCRIPTIONS[sampling]}
    if sampling == "pandas":
        record["shuffle_seed"] = shuffle_seed
    return record
