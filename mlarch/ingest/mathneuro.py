"""Method `mathneuro-bf16`: the MathNeuro authors' own arithmetic, to reproduce the paper's sets.

The exact method (scoring.py) sums per-sample float32 norms in float64 and scores |W| * norms
in float32. The authors' code (their MathNeuro fork, MathNeuroFast.py: `getActivation`,
`compute_score_mask`, `find_good_params`) instead does, for every sample in draw order:

    model in bfloat16, one unpadded sample, no attention mask: model(input_ids)
    forward hook on each Linear:  norm = X.norm(p=2, dim=1).to(bfloat16)   # X: (1, tokens, in)
                                  product = norm * |W|                     # bf16 (out, in), rounded once
    after the forward:            acc += product                           # bf16 accumulator, rounded per sample
    selection:                    torch.topk(|acc|.view(-1), int(numel * k))

so every score keeps 8 significant bits and is rounded once per sample: the sets differ from
the exact ones (issue 15: Jaccard 0.72-0.75 at 500 samples on Gemma-3-270M) and many entries
tie. This module redoes exactly those roundings, in the same order:

* norms: the same op on the same slice, `x[r:r+1, :n].norm(p=2, dim=1)` for a row with n real
  tokens (for one unpadded sample that is the authors' tensor itself), cast to bf16;
* products and sums: `acc.add_(|W| * norm)` as two bf16 ops (a fused multiply-add would round
  once, not twice), in sample order (the draw order; bf16 addition is not associative, so the
  forward passes record per-sample norms and the accumulation runs after them, in order);
* set sizes: int(numel * k) in floating point (the authors'), not top_count's exact decimal
  (they differ for some k, e.g. 0.29 of 100 is 28 here, 29 in the exact method);
* ties: torch.topk's order among equal values is unspecified; here the lowest flat index
  (row-major, out x in) wins, the same rule as the exact method (selection.py).

Conv1D (GPT-2) is not hooked by the authors' code (nn.Linear only); it is scored here like the
exact method scores it, on the out x in view of its weight. Modules and head follow
scoring.scored_modules (no `embed`, no tied head), as the authors' param_dict lookup does.

Forward batching: a padded batch's bf16 forward rounds differently from one sample alone
(different kernels: on tiny Llama, 48 of 120 module inputs differ in some bit), so only
batch size 1 reproduces the authors' activations bit for bit; `methods.PAPER_COMPAT` sets it. Larger
batches are allowed (the same arithmetic on the batch's activations) and recorded.

The scores are not |W| x (a norm vector): a run of this method holds level codes only at the k
it archived and cannot be re-thresholded from factors (mlarch.methods.check_rethreshold, torch-free
for the query side).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from mlarch import methods, selection
from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, error
from mlarch.ingest.scoring import Batch, NormCollector, ScoredModule, _StopForward, batches
from mlarch.methods import authors_count

METHOD = methods.BF16
METHOD_VERSION = 1



def describe() -> dict:
    """The method's provenance record, with the keys of the exact method's (pipeline.METHOD)."""
    return {
        "name": METHOD,
        "version": METHOD_VERSION,
        "score": "bf16 model; per sample s in draw order: acc = bf16(acc + bf16(bf16(||X_s[:, j]||_2) * bf16|W[i,j]|)) "
                 "over the sample's real tokens (the authors' MathNeuroFast.py arithmetic)",
        "k_rule": "per matrix, int(numel * k) in floating point (the authors' keep_num)",
        "tie_rule": "score descending, then lowest flat (row-major, out x in) index first "
                    "(torch.topk's order among ties is unspecified)",
        "math_only": "top-k(math) and not top-k(control), same matrix and k",
        "rethresholdable": False,
    }


def check_bf16(model: nn.Module, modules: list[ScoredModule]) -> None:
    """The authors' arithmetic needs the model in bfloat16 (their forward and their |W|)."""
    other = sorted({str(m.module.weight.dtype).replace("torch.", "") for m in modules} - {"bfloat16"})
    if other:
        raise error(
            UsageError, Arg("method", METHOD), " runs the model in bfloat16 as the authors did, but its scored weights "
            f"are {', '.join(other)}: load it with ", Arg("dtype", "bfloat16")
        )


def weight_magnitudes_bf16(m: ScoredModule) -> torch.Tensor:
    """|W| as bf16, out x in (Conv1D's in x out weight transposed), on the weight's device."""
    weight = m.weight().detach()
    if m.kind == "conv1d":
        weight = weight.t()
    return weight.abs().to(torch.bfloat16).contiguous()


class SampleNormRecorder(NormCollector):
    """The hooks of NormCollector, but each sample's bf16 norm is kept (row `position` of an
    (n_samples, in) bf16 tensor per module), not summed: the bf16 sums must follow sample order."""

    def __init__(self, model: nn.Module, modules: list[ScoredModule], device: torch.device, n_samples: int):
        super().__init__(model, modules, device)
        self.per_sample = {  # beside the weight's values (an offloaded module's are on the CPU)
            m.name: torch.zeros((n_samples, m.n_cols), dtype=torch.bfloat16, device=m.weight().device)
            for m in modules
        }
        self.lengths: list[int] = []
        self.positions: list[int] = []

    def start_rows(self, mask: torch.Tensor, positions: Sequence[int]) -> None:
        """Start a batch whose rows are samples `positions` of the pass, with attention mask `mask` (real tokens per
        row)."""
        self.start_batch(mask)
        self.lengths = mask.sum(dim=1).to(torch.long).tolist()
        self.positions = list(positions)

    def _accumulate(self, name: str, args, kwargs) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        if x is self._last_input:  # q/k/v (gate/up) receive the same tensor: same norms
            norms = self._last_norms
        else:
            mask = self.mask_on(x.device)
            if x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
                raise MlarchError(
                    f"module {name} received an input of shape {tuple(x.shape)}; mlarch scores modules "
                    "whose input is (batch, tokens, features)"
                )
            held = x.detach()
            # the authors' op on each row's real tokens: a (1, n, in) slice, as one unpadded sample is
            norms = torch.cat([held[r : r + 1, :n].norm(p=2, dim=1) for r, n in enumerate(self.lengths)])
            norms = norms.to(torch.bfloat16)
            self._last_input, self._last_norms = x, norms
        store = self.per_sample[name]
        store[self.positions] = norms.to(store.device)

    def result(self) -> dict[str, np.ndarray]:
        """Sum over samples of the bf16 per-sample norms, in float64, as float32: a diagnostic
        (what the exact method would sum), not a factor of this method's scores."""
        return {name: t.to(torch.float64).sum(dim=0).cpu().numpy().astype(np.float32)
                for name, t in self.per_sample.items()}


def accumulate_bf16(per_sample: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """sum over samples, in order, of bf16(norm_s * |W|) into a bf16 accumulator: two roundings
    per sample (product, then sum), as `acc += norm * |W|` does in the authors' code."""
    acc = torch.zeros_like(magnitudes)
    product = torch.empty_like(magnitudes)
    norms = per_sample.to(magnitudes.device)
    for s in range(norms.shape[0]):
        torch.mul(magnitudes, norms[s], out=product)
        acc.add_(product)
    return acc


@dataclass
class Bf16PassResult:
    """What a mathneuro-bf16 pass gives: per module the bf16 scores, diagnostic float32 norm sums, tokens scored,
    texts truncated and seconds."""
    scores: dict[str, torch.Tensor]  # module -> bf16 scores (out x in), on the CPU
    norms: dict[str, np.ndarray]  # diagnostic: float32 sums of the bf16 per-sample norms (see result())
    n_tokens: int
    n_truncated: int
    seconds: float


def forward_one(model: nn.Module, batch: Batch, device: torch.device) -> None:
    """One forward as the authors ran it: a single unpadded sample gets no attention mask."""
    input_ids = batch.input_ids.to(device)
    try:
        if input_ids.shape[0] == 1 and bool(batch.attention.all()):
            model(input_ids=input_ids, use_cache=False)
        else:
            model(input_ids=input_ids, attention_mask=batch.attention.to(device), use_cache=False)
    except _StopForward:
        pass


def run_pass_bf16(
    model: nn.Module,
    tokenizer,
    modules: list[ScoredModule],
    texts: list[str],
    *,
    batch_size: int,
    max_length: int | None,
    device: torch.device,
    on_batch: Callable[[int, int], None] = lambda samples, tokens: None,
) -> Bf16PassResult:
    """The authors' bf16 scores of every scored module over `texts` (in that order: the draw).

    Same inputs as scoring.run_pass (the same `batches`); forwards first, recording per-sample
    norms, then the bf16 accumulation module by module (one full-size accumulator on the
    device at a time, moved to the CPU)."""
    check_bf16(model, modules)
    started = time.perf_counter()
    vocab = model.get_input_embeddings().weight.shape[0]
    inputs, n_truncated = batches(tokenizer, texts, batch_size=batch_size, max_length=max_length, vocab=vocab)
    recorder = SampleNormRecorder(model, modules, device, len(texts))
    n_tokens = 0
    try:
        with torch.inference_mode():
            for batch in inputs:
                recorder.start_rows(batch.attention.to(device=device, dtype=torch.float32), batch.items)
                forward_one(model, batch, device)
                tokens = int(batch.attention.sum())
                n_tokens += tokens
                on_batch(len(batch.items), tokens)
    finally:
        recorder.remove()
    scores = {}
    with torch.inference_mode():
        for m in modules:
            scores[m.name] = accumulate_bf16(recorder.per_sample[m.name], weight_magnitudes_bf16(m)).cpu()
    return Bf16PassResult(scores, recorder.result(), n_tokens, n_truncated, time.perf_counter() - started)


def levels_bf16(scores: torch.Tensor, ks: Sequence[float]) -> np.ndarray:
    """uint8 level codes (selection.py's coding) of one matrix's bf16 scores: the top
    int(numel * k) per k, ties to the lowest flat index. bf16 -> float32 is exact."""
    values = scores.detach().to(device="cpu", dtype=torch.float32).abs().numpy()
    return selection.level_codes(values, ks, counts=[authors_count(values.size, k) for k in ks])


def model_levels_bf16(spans, scores: dict[str, torch.Tensor], ks: Sequence[float]) -> np.ndarray:
    """Level codes of every module, concatenated in the archive's layout (`spans`), like
    selection.model_levels does for the exact method."""
    total = sum(span.n_params for span in spans)
    levels = np.empty(total, dtype=np.uint8)
    for span in spans:
        levels[span.params] = levels_bf16(scores[span.module], ks).reshape(-1)
    return levels
