"""Activation norms for MathNeuro: one forward pass per batch, hooks on every scored module.

For each scored module and each sample s, the hook adds ||X_s[:, j]||_2 (over the
sample's real tokens only) to a float64 accumulator of length `in`. That vector is all
a pass produces; the score |W| * norms is formed later, per matrix.

With --device-map auto the modules sit on several devices: each hook computes its norms on
the device its input is on and keeps that module's sums there (the same per-module sums, in
the same sample order, as on one device of that kind); `result` brings them to the host in
module order. |W| is read from the tensor that holds the values (placement.resident_weight).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from mlarch.errors import MlarchError

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_of(name: str) -> int | None:
    """Transformer block index in a module name (layers.N, h.N, blocks.N); None outside blocks."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class ScoredModule:
    """A weight matrix that is scored: its name, the module, kind (linear or conv1d), block index (None outside
    blocks) and shape (out x in as scored)."""
    name: str
    module: nn.Module
    kind: str  # 'linear' | 'conv1d'
    layer: int | None
    n_rows: int  # out features
    n_cols: int  # in features

    @property
    def n_params(self) -> int:
        """Entries of the weight matrix (n_rows x n_cols)."""
        return self.n_rows * self.n_cols

    def weight(self) -> torch.Tensor:
        """The weight's values: `module.weight`, or where accelerate keeps an offloaded module's."""
        from mlarch.ingest.placement import resident_weight

        return resident_weight(self.module)

    def scored_weight(self) -> torch.Tensor:
        """The weight as scored, out x in, where it lives (Conv1D stores in x out: a
        transposed view of it, no copy)."""
        weight = self.weight().detach()
        return weight.t() if self.kind == "conv1d" else weight

    def magnitudes(self, out: np.ndarray | None = None) -> np.ndarray:
        """|W| as float32, out x in (Conv1D stores in x out, so it is transposed); written
        into `out` (n_params float32, e.g. a slice of the model's array) when given."""
        weight = self.scored_weight()
        if out is None:
            return weight.abs().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        target = torch.from_numpy(out).view(self.n_rows, self.n_cols)
        if weight.dtype == torch.float32 and weight.device.type == "cpu":
            torch.abs(weight, out=target)  # one pass, no temporary
        else:
            target.copy_(weight.abs())
        return out


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old or very new transformers
        return ()
    return (Conv1D,)


def output_head(model: nn.Module) -> tuple[nn.Module | None, bool]:
    """The output head and whether its weight is tied to the input embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None or getattr(head, "weight", None) is None:
        return head, False
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    return head, tied


def scored_modules(model: nn.Module) -> list[ScoredModule]:
    """Every nn.Linear and transformers Conv1D, minus `embed` parameters and a tied head."""
    head, tied = output_head(model)
    conv1d = _conv1d_type()
    found = []
    for name, module in model.named_modules():
        if "embed" in name or (tied and module is head):
            continue
        if isinstance(module, nn.Linear):
            rows, cols = module.weight.shape
            found.append(ScoredModule(name, module, "linear", layer_of(name), rows, cols))
        elif conv1d and isinstance(module, conv1d):
            cols, rows = module.weight.shape
            found.append(ScoredModule(name, module, "conv1d", layer_of(name), rows, cols))
    return found


class _StopForward(Exception):
    """Raised at the output head: its inputs are all we need, its logits are not."""


@dataclass
class PassResult:
    """What a scoring pass gives: per module the float32 activation-norm vector over its inputs, tokens scored, texts
    truncated and seconds."""
    norms: dict[str, np.ndarray]  # module -> float32 vector of length n_cols
    n_tokens: int
    n_truncated: int
    seconds: float


def tokenize(tokenizer, texts: list[str], max_length: int | None) -> tuple[list[list[int]], int]:
    """Token ids with the tokenizer's default special tokens, cut to max_length (None: never cut,
    as the MathNeuro authors' code does)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # silence "sequence longer than model max" warnings
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    long = [] if max_length is None else [i for i, seq in enumerate(ids) if len(seq) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length)
        for i, seq in zip(long, cut["input_ids"]):
            ids[i] = seq
    return [list(seq) for seq in ids], len(long)


# tokens a text of n UTF-8 bytes can have at most: one per byte (byte-level BPE, byte
# fallback), plus the tokenizer's special and prefix tokens
_SPECIAL_TOKENS = 16


def trained_positions(config) -> int | None:
    """How many positions the model was made for (a config object or config.json's dict):
    GPT-2's table of learned positions (n_positions; past it the forward pass fails), or a
    rotary model's max_position_embeddings (past it positions are extrapolated: activations,
    and so scores, from inputs the model never saw). None where the config names neither."""
    for key in ("n_positions", "max_position_embeddings"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def may_exceed(text: str, positions: int) -> bool:
    """Whether `text` is long enough in bytes to tokenize to more than `positions` tokens."""
    return len(text.encode("utf-8")) + _SPECIAL_TOKENS > positions


def over_positions(tokenizer, texts: list[str], max_length: int | None, positions: int) -> tuple[int, int] | None:
    """(index, tokens) of the first text with more tokens than `positions` as scoring cuts it
    (`tokenize`), else None. Only texts long enough in bytes to get there are tokenized."""
    long = [i for i, text in enumerate(texts) if may_exceed(text, positions)]
    if not long or (max_length is not None and max_length <= positions):
        return None
    ids, _ = tokenize(tokenizer, [texts[i] for i in long], max_length)
    return next(((i, len(seq)) for i, seq in zip(long, ids) if len(seq) > positions), None)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sample indices grouped by token length so that batches carry little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class Batch:
    """One forward pass's input: right-padded token ids, the attention mask and the index in `texts` of each row."""
    input_ids: torch.Tensor  # (rows, width) long, on the CPU, right-padded
    attention: torch.Tensor  # (rows, width) long: 1 on real tokens, 0 on padding
    items: tuple[int, ...] = ()  # index in `texts` of each row


def batches(tokenizer, texts: list[str], *, batch_size: int, max_length: int | None, vocab: int) -> tuple[list[Batch], int]:
    """The forward passes' inputs for `texts` and how many texts were cut to max_length (None: no cut).

    The one place that tokenizes, checks and batches texts: `run_pass` forwards these and
    the benchmarks' bare-forward baseline forwards the very same batches."""
    ids, n_truncated = tokenize(tokenizer, texts, max_length)
    for i, seq in enumerate(ids):
        if not seq:
            raise MlarchError(f"text {i} tokenizes to nothing; remove empty items from the data")
        if max(seq) >= vocab:
            raise MlarchError(
                f"the tokenizer produced id {max(seq)} but the model's embedding has {vocab} rows: "
                "tokenizer and model do not match"
            )
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None and 0 <= pad < vocab else 0  # padded positions are masked out
    out = []
    for batch in length_batches([len(s) for s in ids], batch_size):
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding keeps real positions 0..n-1
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            attention[row, : len(ids[i])] = 1
        out.append(Batch(input_ids, attention, tuple(batch)))
    return out, n_truncated


class NormCollector:
    """Forward pre-hooks that sum per-sample L2 norms of each scored module's input."""

    def __init__(self, model: nn.Module, modules: list[ScoredModule], device: torch.device):
        self.sums = {m.name: torch.zeros(m.n_cols, dtype=torch.float64, device=device) for m in modules}
        self.mask: torch.Tensor | None = None
        self._masks: dict[torch.device, torch.Tensor] = {}  # the batch's mask on each device inputs arrive on
        self._last_input: torch.Tensor | None = None  # held, so its identity cannot be reused
        self._last_norms: torch.Tensor | None = None
        self.handles = []
        head, _ = output_head(model)
        scored = {id(m.module): m.name for m in modules}
        for m in modules:
            if m.module is not head:
                self.handles.append(m.module.register_forward_pre_hook(self._hook(m.name), with_kwargs=True))
        if head is not None:
            self.handles.append(
                head.register_forward_pre_hook(self._head_hook(scored.get(id(head))), with_kwargs=True)
            )

    def _accumulate(self, name: str, args, kwargs) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        if x is self._last_input:  # q/k/v (gate/up) receive the same tensor: same norms
            self.sums[name].add_(self._last_norms)
            return
        mask = self.mask_on(x.device)
        if x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
            raise MlarchError(
                f"module {name} received an input of shape {tuple(x.shape)}; mlarch scores modules "
                "whose input is (batch, tokens, features)"
            )
        xf = x.detach() if x.dtype == torch.float32 else x.detach().to(torch.float32)
        # sum over real tokens of x^2 as one batched matmul (padding has mask 0): faster
        # than einsum or a strided vector_norm for these shapes
        norms = torch.bmm(mask[:, None, :], xf * xf).sqrt_()
        # per-sample float32 norms, summed in float64 (add_ promotes; no extra kernel at batch 1)
        norms = norms.view(-1) if norms.shape[0] == 1 else norms.squeeze(1).sum(dim=0, dtype=torch.float64)
        if self.sums[name].device != norms.device:  # first batch of a module on another device: zeros, moved once
            self.sums[name] = self.sums[name].to(norms.device)
        self.sums[name].add_(norms)
        self._last_input, self._last_norms = x, norms

    def start_batch(self, mask: torch.Tensor) -> None:
        """Start a batch with attention mask `mask` (its padding is left out of the norms)."""
        self.mask, self._last_input, self._last_norms = mask, None, None
        self._masks = {mask.device: mask}

    def mask_on(self, device: torch.device) -> torch.Tensor:
        """The batch's mask on `device` (copied once per batch and device: exact)."""
        mask = self._masks.get(device)
        if mask is None:
            mask = self._masks[device] = self.mask.to(device)
        return mask

    def _hook(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            self._accumulate(name, args, kwargs)

        return hook

    def _head_hook(self, name: str | None) -> Callable:
        def hook(module, args, kwargs):
            if name is not None:
                self._accumulate(name, args, kwargs)
            raise _StopForward

        return hook

    def remove(self) -> None:
        """Remove the forward hooks from the model."""
        for handle in self.handles:
            handle.remove()

    def result(self) -> dict[str, np.ndarray]:
        """Each module's sums on the host, in the scored modules' order."""
        return {name: acc.cpu().numpy().astype(np.float32) for name, acc in self.sums.items()}


def run_pass(
    model: nn.Module,
    tokenizer,
    modules: list[ScoredModule],
    texts: list[str],
    *,
    batch_size: int,
    max_length: int | None,
    device: torch.device,
    on_batch: Callable[[int, int], None] = lambda samples, tokens: None,
) -> PassResult:
    """Sum of per-sample activation norms for every scored module over `texts`."""
    started = time.perf_counter()
    vocab = model.get_input_embeddings().weight.shape[0]
    inputs, n_truncated = batches(tokenizer, texts, batch_size=batch_size, max_length=max_length, vocab=vocab)
    collector = NormCollector(model, modules, device)
    n_tokens = 0
    try:
        with torch.inference_mode():
            for batch in inputs:
                input_ids, attention = batch.input_ids.to(device), batch.attention.to(device)
                collector.start_batch(attention.to(torch.float32))
                try:
                    model(input_ids=input_ids, attention_mask=attention, use_cache=False)
                except _StopForward:
                    pass
                tokens = int(attention.sum())
                n_tokens += tokens
                on_batch(len(input_ids), tokens)
    finally:
        collector.remove()
    return PassResult(collector.result(), n_tokens, n_truncated, time.perf_counter() - started)
