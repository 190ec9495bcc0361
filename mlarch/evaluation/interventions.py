"""Interventions on a language's math-only set: prune it (x0), scale it, or a null.

A spec names what to change (`parse`); `plan` turns it into the flat (row-major, out x in)
indices of every scored matrix's entries to change, from the archive's masks alone; and
`applied` changes those entries of a loaded model in place for the duration of a `with`
block, restoring the saved values bit for bit on the way out (also on an exception), so
one loaded model serves many interventions.

Kinds:
  prune:LANG@K       set the math-only set of LANG at K to 0
  scale:LANG@K:F     multiply it by F (any finite float but 0: x0 is prune:LANG@K)
  random:LANG@K      the null: in each matrix, as many uniformly random entries of the
                     whole matrix as the set has there, set to 0
  fraction:LANG@K:F  set a random fraction F in (0, 1] of the set to 0 (per matrix,
                     top_count(set size, F) entries)
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from mlarch.errors import MlarchError, UsageError
from mlarch.selection import top_count

KINDS = ("prune", "scale", "random", "fraction")
_WITH_FACTOR = ("scale", "fraction")
_LANG = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")  # used with fullmatch: '$' would pass "en\n"
# a plain decimal number: no 'nan', 'inf', '1_0', spaces or other things float() accepts
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")  # fullmatch
_GRAMMAR = "use prune:LANG@K, scale:LANG@K:F, random:LANG@K or fraction:LANG@K:F"

RANDOM_RULE = (
    "per module (position = index in the model's scored order): "
    "numpy.random.default_rng([seed, position, stream]).choice(a, m, replace=False), sorted ascending; "
    "stream 1 = random: a = n_rows * n_cols (flat row-major out x in indices of the whole matrix), "
    "m = size of the set in that module; "
    "stream 2 = fraction: a = numpy.flatnonzero(set mask), m = mlarch.selection.top_count(size of the set, F)"
)


def _fail(problem: str, hint: str = "") -> UsageError:
    return UsageError(f"{problem}: {_GRAMMAR}{hint}")


def _scale_by_zero(what: str, lang: str, k: float) -> UsageError:
    """x0 is pruning under a second label (two labels, two rows, for one intervention)."""
    return UsageError(f"{what} scales by 0, which is pruning: use prune:{lang}@{float(k)!r}")


def _number(text: str) -> float | None:
    """The finite float `text` spells as a plain decimal, else None."""
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Intervention:
    """One intervention spec, e.g. prune:en@0.01: its kind (prune, scale, random, fraction), the language whose
    math-only set it changes, k, and the factor of scale and fraction (None otherwise)."""
    kind: str
    lang: str
    k: float
    factor: float | None

    def __post_init__(self):
        # direct construction gets the checks parse() makes, and canonical floats (a numpy
        # scalar's repr would spoil the label)
        if self.kind not in KINDS:
            raise _fail(f"unknown intervention kind {self.kind!r}")
        if not isinstance(self.lang, str) or not _LANG.fullmatch(self.lang):
            raise _fail(f"bad language {self.lang!r} in a {self.kind} intervention",
                        " (LANG: a letter, then up to 31 letters, digits, '_' or '-')")
        k = float(self.k)
        if not 0 < k < 1:  # false for nan too
            raise _fail(f"k = {self.k!r} of a {self.kind} intervention is outside (0, 1)")
        object.__setattr__(self, "k", k)
        if self.kind in _WITH_FACTOR:
            if self.factor is None:
                raise _fail(f"a {self.kind} intervention needs a factor F")
            factor = float(self.factor)
            if not math.isfinite(factor):
                raise _fail(f"the factor {self.factor!r} of a {self.kind} intervention is not a finite number")
            if self.kind == "fraction" and not 0 < factor <= 1:
                raise _fail(f"the fraction {self.factor!r} is outside (0, 1]")
            if self.kind == "scale" and factor == 0:  # -0.0 too
                raise _scale_by_zero(f"the factor {self.factor!r} of a scale intervention", self.lang, k)
            object.__setattr__(self, "factor", factor)
        elif self.factor is not None:
            raise _fail(f"a {self.kind} intervention takes no factor, but {self.factor!r} was given")

    @property
    def label(self) -> str:
        """The canonical spec: parse(i.label) == i."""
        tail = f":{self.factor!r}" if self.factor is not None else ""
        return f"{self.kind}:{self.lang}@{self.k!r}{tail}"


def parse(spec: str) -> Intervention:
    """An Intervention from `prune:LANG@K`, `scale:LANG@K:F`, `random:LANG@K` or
    `fraction:LANG@K:F`; any other text raises a one-line UsageError naming it."""
    if not isinstance(spec, str):
        raise _fail(f"intervention {spec!r} is not text")
    kind, colon, rest = spec.partition(":")
    if kind not in KINDS:
        raise _fail(f"unknown intervention kind {kind!r} in {spec!r}")
    if not colon:
        raise _fail(f"missing ':' after the kind in {spec!r}")
    lang, at, tail = rest.partition("@")
    if not at:
        raise _fail(f"missing '@' before K in {spec!r}")
    if not _LANG.fullmatch(lang):
        raise _fail(f"bad language {lang!r} in {spec!r}",
                    " (LANG: a letter, then up to 31 letters, digits, '_' or '-')")
    k_text, colon, f_text = tail.partition(":")
    k = _number(k_text)
    if k is None:
        raise _fail(f"k {k_text!r} in {spec!r} is not a finite number", " (K strictly between 0 and 1)")
    if not 0 < k < 1:
        raise _fail(f"k {k_text!r} in {spec!r} is outside (0, 1)", " (K strictly between 0 and 1)")
    factor = None
    if kind in _WITH_FACTOR:
        if not colon or not f_text:
            raise _fail(f"{kind} needs a factor F after K in {spec!r}")
        factor = _number(f_text)
        if factor is None:
            raise _fail(f"the factor {f_text!r} in {spec!r} is not a finite number")
        if kind == "fraction" and not 0 < factor <= 1:
            raise _fail(f"the fraction {f_text!r} in {spec!r} is outside (0, 1]")
        if kind == "scale" and factor == 0:
            raise _scale_by_zero(f"the factor {f_text!r} in {spec!r}", lang, k)
    elif colon:
        raise _fail(f"{kind} takes no factor, but {spec!r} gives {':' + f_text!r}")
    return Intervention(kind, lang, k, factor)


@dataclass
class ModuleChange:
    """The entries of one scored module that an intervention changes (flat row-major indices)."""
    module: str
    position: int  # index in the model's scored order
    indices: np.ndarray  # int64, ascending: flat row-major (out x in) indices of the entries to change


@dataclass
class Plan:
    """What one intervention changes at a seed: the entries per module, and the size of the language's math-only set
    it was drawn from."""
    intervention: Intervention
    seed: int
    changes: list[ModuleChange]
    n_set: int  # size of the language's math-only set at k, over all modules

    @property
    def n_changed(self) -> int:
        """How many weight entries the plan sets (to 0, or scaled), over all modules."""
        return sum(len(change.indices) for change in self.changes)


def plan(archive, model: str, intervention: Intervention, seed: int, modules: list[tuple[str, int, int]],
         analysis: str | None = None) -> Plan:
    """The entries `intervention` changes in each of `modules` ([(name, n_rows, n_cols)] in
    the model's scored order), from archive.selection(model, lang, k, module, seed=seed,
    analysis=analysis) (None: the model's only analysis).
    Random draws follow RANDOM_RULE. Every module gets a ModuleChange, empty or not."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed {seed!r} is not a non-negative integer: pass the seed the runs were ingested with")
    seed = int(seed)
    kind, changes, n_set = intervention.kind, [], 0
    for position, (name, n_rows, n_cols) in enumerate(modules):
        n_rows, n_cols = int(n_rows), int(n_cols)
        mask = archive.selection(model, intervention.lang, intervention.k, name, seed=seed, analysis=analysis)
        if mask.shape != (n_rows, n_cols):
            raise MlarchError(f"the mask of {model!r} module {name!r} is {mask.shape[0]}x{mask.shape[1]}, but the "
                              f"module is {n_rows}x{n_cols}: run `mlarch verify`")
        size = int(np.count_nonzero(mask))
        n_set += size
        if kind in ("prune", "scale"):
            indices = np.flatnonzero(mask)
        elif kind == "random":
            rng = np.random.default_rng([seed, position, 1])
            indices = np.sort(rng.choice(n_rows * n_cols, size, replace=False))
        else:  # fraction
            rng = np.random.default_rng([seed, position, 2])
            indices = np.sort(rng.choice(np.flatnonzero(mask), top_count(size, intervention.factor), replace=False))
        changes.append(ModuleChange(name, position, indices.astype(np.int64, copy=False)))
    return Plan(intervention, seed, changes, n_set)


_MISMATCH = ": the masks belong to other weights; load the model that was ingested"


def check_modules(archived: list[tuple[str, int, int]], loaded: list) -> None:
    """Refuse (one-line MlarchError) unless the loaded model's scored modules (ScoredModule
    list) have the archive's names, order and shapes (out x in)."""
    archived = [(str(name), int(rows), int(cols)) for name, rows, cols in archived]
    for position, (want, have) in enumerate(zip(archived, loaded)):
        if want[0] != have.name:
            raise MlarchError(f"scored module {position} of the loaded model is {have.name!r}, "
                              f"in the archive {want[0]!r}" + _MISMATCH)
        if (want[1], want[2]) != (have.n_rows, have.n_cols):
            raise MlarchError(f"module {have.name!r} of the loaded model is {have.n_rows}x{have.n_cols} (out x in), "
                              f"in the archive {want[1]}x{want[2]}" + _MISMATCH)
    if len(loaded) > len(archived):
        raise MlarchError(f"the loaded model has {len(loaded)} scored modules, the archive {len(archived)} "
                          f"(first extra: {loaded[len(archived)].name!r})" + _MISMATCH)
    if len(loaded) < len(archived):
        raise MlarchError(f"the loaded model has {len(loaded)} scored modules, the archive {len(archived)} "
                          f"(first missing: {archived[len(loaded)][0]!r})" + _MISMATCH)


def _targets(modules: list, plan: Plan) -> list:
    """(ScoredModule, change) for each non-empty change, checked before anything changes."""
    by_name = {m.name: m for m in modules}
    targets = []
    for change in plan.changes:
        if len(change.indices) == 0:
            continue
        module = by_name.get(change.module)
        if module is None:
            raise MlarchError(f"the plan changes module {change.module!r}, which the loaded model does not have"
                              + _MISMATCH)
        if change.indices[0] < 0 or change.indices[-1] >= module.n_params:
            raise MlarchError(f"the plan's indices for {change.module!r} run outside its {module.n_rows}x"
                              f"{module.n_cols} weight" + _MISMATCH)
        targets.append((module, change))
    return targets


@dataclass(frozen=True)
class Applied:
    """A plan in place on the weights, and how many entries it changed (Plan.n_changed sets them)."""
    plan: Plan
    n_changed: int


@contextmanager
def applied(modules: list, plan: Plan):
    """Apply `plan` to the weights of `modules` (ScoredModules of the loaded model) in
    place; restore every changed entry from its saved value on exit, exception or not.
    Yields an Applied: how many stored values the plan really changed (an entry that was 0
    already, or a bfloat16 value that x1.003 rounds back to itself, is not changed).

    Only the changed entries are copied (gathered before the change, scattered back after),
    so the cost is O(entries changed), not O(model)."""
    intervention = plan.intervention
    targets = _targets(modules, plan)
    saved = []  # (view, rows, cols, old), in the order applied
    moved = 0  # entries whose stored value changed (bfloat16 rounds x1.001 back to x; a 0 stays 0)
    try:
        with torch.no_grad():
            for module, change in targets:
                # the tensor holding the values, on its own device: with --device-map auto an
                # offloaded module's (on the CPU), which accelerate copies for each forward
                weight = module.weight()
                view = weight.t() if module.kind == "conv1d" else weight  # out x in, shares storage
                flat = torch.from_numpy(change.indices).to(weight.device)
                rows, cols = flat // module.n_cols, flat % module.n_cols
                old = view[rows, cols]  # advanced indexing gathers into a new tensor: a copy already
                saved.append((view, rows, cols, old))  # before the write: a failed write is still undone
                if intervention.kind == "scale":
                    new = old * intervention.factor  # python float: stays in the weight's dtype
                    overflow = int((~torch.isfinite(new) & torch.isfinite(old)).sum())
                    if overflow:  # every task would measure a broken model (accuracy read 0.0): never a row
                        raise MlarchError(f"scaling by {intervention.factor:g} makes {overflow:,} weights of "
                                          f"{module.name} overflow to inf or NaN in {weight.dtype}: choose a "
                                          "smaller factor")
                    view[rows, cols] = new
                    moved += int((new != old).sum())
                else:
                    view[rows, cols] = 0
                    moved += int(torch.count_nonzero(old))
            if intervention.kind == "scale" and saved and not moved:
                raise MlarchError(f"scaling by {intervention.factor:g} changes no weight: in "
                                  f"{saved[0][0].dtype} every scaled value rounds back to itself; choose a factor "
                                  "further from 1")
        yield Applied(plan, moved)
    finally:
        with torch.no_grad():
            for view, rows, cols, old in reversed(saved):  # reversed: right even if two modules shared a weight
                view[rows, cols] = old
