"""What scoring a unit needs once the model is loaded: a ScoringContext.

`prepare` loads the model where the units run (this process, or a Ray worker) and gathers
what `units.score_run` needs besides the unit itself: the model, its scored modules and
their layout, the |W| buffer, the recorded configuration and environment, and where a run's
selection runs (`selection_path`: on CUDA where the weights are, else numpy on the host;
`ScoringContext.model_levels` runs it). ModelInfo is the part of it the catalog records (no
torch objects): what a worker hands the driver.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mlarch import methods, parallel, selection
from mlarch.errors import MlarchError, UsageError
from mlarch.ingest import provenance
from mlarch.ingest.config import IngestConfig, recorded_config
from mlarch.store import spans as span_layout


@dataclass(frozen=True)
class ModuleInfo:
    """A scored module as the catalog's `modules` table holds it."""
    name: str
    layer: int | None
    kind: str
    n_rows: int
    n_cols: int

    @property
    def n_params(self) -> int:
        """Entries of the module's weight matrix (n_rows x n_cols)."""
        return self.n_rows * self.n_cols


@dataclass(frozen=True)
class ModelInfo:
    """What the catalog records of a loaded model: picklable, no weights."""
    source: str
    source_kind: str
    revision: str | None
    commit_sha: str | None
    weights_sha256: str
    dtype: str
    architecture: str
    modules: tuple[ModuleInfo, ...]

    @classmethod
    def of(cls, loaded, modules) -> ModelInfo:
        """The ModelInfo of a loaded model and its scored modules."""
        return cls(loaded.source, loaded.source_kind, loaded.revision, loaded.commit_sha, loaded.weights_sha256,
                   loaded.dtype, loaded.architecture,
                   tuple(ModuleInfo(m.name, m.layer, m.kind, m.n_rows, m.n_cols) for m in modules))

    def spans(self) -> list:
        """The scored modules laid out as Spans (offsets in the concatenated arrays), in scored order."""
        return span_layout.layout([(m.name, m.layer, m.n_rows, m.n_cols) for m in self.modules])


@dataclass(frozen=True)
class WorkOrder:
    """The part of a Plan that scoring needs (picklable: it travels to Ray workers)."""
    cfg: IngestConfig
    name: str
    analysis: str
    kind: str
    device: object  # torch.device
    dtype: str
    store: Path  # the array store runs write into
    items: dict  # (lang, role) -> LoadedItems
    source_info: dict  # role -> (dataset name, its description)
    pools: dict


@dataclass
class ScoringContext:
    """Everything `pipeline._score_run` needs besides the unit and its run id."""
    order: WorkOrder
    loaded: object  # loading.LoadedModel
    modules: list  # scoring.ScoredModule
    spans: list
    magnitudes: np.ndarray  # |W| of every scored parameter, filled by extract_magnitudes
    run_pass: Callable
    batch_size: int
    env: dict
    config: dict  # the recorded configuration
    reporter: object
    background: object = field(default_factory=parallel.Inline)  # where selection and writes run
    magnitudes_ready: Future | None = None
    selection: str = "numpy"  # where scores and level codes are computed: see selection_path

    def model_levels(self, norms: np.ndarray) -> np.ndarray:
        """A run's level codes from its concatenated float32 norms (|W| x norms, top-k): on
        the host from the |W| buffer ("numpy"), or where the weights live with only the uint8
        codes moved to the host ("torch"). Both give the same bytes. When scoring runs on
        CUDA, modules a device map left on the CPU take the numpy path; only a run forced
        onto the torch path on the CPU (MLARCH_SELECTION=torch, for tests) uses torch there."""
        self.magnitudes_ready.result()  # the host path reads |W| from the buffer
        if self.selection == "torch":
            from mlarch.selection_device import weights_levels

            host = self.magnitudes if self.order.device.type == "cuda" else None
            return weights_levels([m.scored_weight() for m in self.modules], self.spans, norms, self.cfg.top_k,
                                  host_magnitudes=host)
        return selection.model_levels(self.spans, self.magnitudes, norms, self.cfg.top_k)

    @property
    def cfg(self) -> IngestConfig:
        """The ingest configuration of the work order."""
        return self.order.cfg

    @property
    def info(self) -> ModelInfo:
        """What is recorded of the loaded model and its scored modules (a ModelInfo)."""
        return ModelInfo.of(self.loaded, self.modules)

    def extract_magnitudes(self) -> Future:
        """|W| into the buffer, queued on `background` before any run's selection (the queue
        runs in order, so a selection waiting on it never waits for long)."""
        def fill() -> None:
            for m, span in zip(self.modules, self.spans):
                m.magnitudes(out=self.magnitudes[span.params])

        self.magnitudes_ready = self.background.submit(fill)
        return self.magnitudes_ready


def prepare(order: WorkOrder, reporter) -> ScoringContext:
    """Load the model of `order` and check it can be scored (before any run row exists)."""
    from mlarch.ingest import loading
    from mlarch.ingest.scoring import scored_modules

    cfg = order.cfg
    chosen = selection_path(order.device, cfg.method)  # a bad MLARCH_SELECTION fails before the model loads
    reporter.message(f"loading {cfg.model} ({order.kind}, {order.dtype}, {order.device})")
    loaded = loading.load(cfg.model, revision=cfg.revision, device=order.device, dtype=order.dtype,
                          **loading.options(cfg), message=reporter.message)
    modules = scored_modules(loaded.model)
    if not modules:
        raise MlarchError(f"model {cfg.model} has no nn.Linear or Conv1D modules to score")
    check_finite(cfg.model, modules)
    if cfg.method == methods.BF16:  # a guard: validate made the dtype bfloat16 already
        from mlarch.ingest import mathneuro

        mathneuro.check_bf16(loaded.model, modules)
        run_pass = mathneuro.run_pass_bf16
    else:
        from mlarch.ingest.scoring import run_pass
    spans = span_layout.layout([(m.name, m.layer, m.n_rows, m.n_cols) for m in modules])
    magnitudes = np.empty(span_layout.total_params(spans), dtype=np.float32)
    device = order.device
    batch_size = cfg.batch_size or (16 if device.type == "cuda" else 1)
    config = recorded_config(cfg, name=order.name, analysis=order.analysis, dtype=order.dtype, device=str(device),
                             batch_size=batch_size)
    env = {**provenance.environment(device), "selection": chosen}  # not part of any digest: same bytes either way
    return ScoringContext(order, loaded, modules, spans, magnitudes, run_pass, batch_size, env, config, reporter,
                          selection=chosen)


SELECTION_ENV = "MLARCH_SELECTION"


def selection_path(device, method: str) -> str:
    """Where a run's scores and level codes are computed: "torch" (on the weights' device,
    only uint8 codes copied to the host) when scoring runs on CUDA, else "numpy" (the host
    CPU, from the |W| buffer). The bf16 method has its own selection ("numpy" here).

    MLARCH_SELECTION=torch or =numpy forces a path (tests run the torch path on CPU with
    it; benchmarks compare the two on CUDA); unset or "auto" chooses as above. The output
    is the same bytes on either path, so the choice is recorded in provenance ("selection")
    but is part of no run's identity."""
    forced = os.environ.get(SELECTION_ENV, "auto").strip().lower() or "auto"
    if forced not in ("auto", "numpy", "torch"):
        raise UsageError(f"{SELECTION_ENV}={os.environ[SELECTION_ENV]!r} is not a selection path: "
                         "set it to auto, numpy or torch, or unset it")
    if method == methods.BF16:
        return "numpy"
    if forced != "auto":
        return forced
    return "torch" if getattr(device, "type", str(device)) == "cuda" else "numpy"


def check_finite(ref: str, modules) -> None:
    """Refuse weights that are inf or NaN before any run row is written: their scores have
    no top-k (selection would fail after the forward passes, or rank garbage)."""
    import torch

    def finite(weight) -> bool:  # min and max carry any NaN or inf, with no temporary (~0.05 s / 100 M)
        low, high = torch.aminmax(weight)
        return bool(torch.isfinite(low) & torch.isfinite(high))

    with torch.no_grad():
        bad = [m.name for m in modules if not finite(m.weight().detach())]
    if bad:
        raise MlarchError(f"model {ref} has inf or NaN weights in {len(bad)} scored module(s) ({', '.join(bad[:3])}"
                          f"{', ...' if len(bad) > 3 else ''}): the checkpoint is damaged; restore its weight files")
