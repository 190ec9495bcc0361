"""The two evaluation passes: teacher-forced NLL of texts and greedy generation from prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from mlarch.errors import MlarchError
from mlarch.wording import Arg, error
from mlarch.evaluation import answers
from mlarch.ingest import scoring


@dataclass
class NllResult:
    """Negative log-likelihood of texts: per text the summed NLL and the tokens predicted, texts cut at max_length,
    and the seconds taken."""
    nll: list[float]  # per text, in input order: summed natural-log NLL of every token after the first
    n_tokens: list[int]  # per text: tokens predicted (its token count - 1)
    n_truncated: int
    seconds: float


@dataclass
class GenerationResult:
    """Greedy completions of prompts, cut at the stop strings, with the tokens kept per prompt and the seconds taken."""
    completions: list[str]  # per prompt, in input order: decoded greedy continuation, cut at the stops
    n_tokens: list[int]  # per prompt: generated tokens kept (up to eos, or to the token completing a stop)
    seconds: float


_MIN_BLOCK = 1 << 24  # float32 log-probabilities formed at a time, at least (64 MiB)


def _block(logits: torch.Tensor) -> int:
    """Elements log-softmaxed at once: contiguous blocks of rows (few kernels), each block's
    float32 temporaries (a cast of bf16 logits, the log-probabilities) at most half the logits'
    bytes, so that a batch never needs much more than twice its logits' memory."""
    return max(_MIN_BLOCK, logits.numel() * logits.element_size() // 8)


def _row_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Per-row float64 sum of -log p(token t+1 | tokens <= t) over real (right-padded) tokens."""
    rows, width, vocab = logits.shape
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]  # the last position predicts nothing: target 0, masked below
    mask = torch.zeros_like(attention, dtype=torch.bool)
    mask[:, :-1] = attention[:, 1:].bool()  # right padding: target t+1 is real iff its mask is 1
    token_nll = torch.empty((rows, width), dtype=torch.float32, device=logits.device)
    block = _block(logits)
    if block >= width * vocab:
        step = block // (width * vocab)
        for start in range(0, rows, step):
            stop = start + step
            logp = torch.log_softmax(logits[start:stop], dim=-1, dtype=torch.float32)
            token_nll[start:stop] = logp.gather(-1, targets[start:stop, :, None]).squeeze(-1)
    else:  # one row is too much at once: blocks of its positions
        step = max(1, block // vocab)
        for row in range(rows):
            for start in range(0, width, step):
                stop = start + step
                logp = torch.log_softmax(logits[row, start:stop], dim=-1, dtype=torch.float32)
                token_nll[row, start:stop] = logp.gather(-1, targets[row, start:stop, None]).squeeze(-1)
    # where(), not a product: a NaN at a padded position cannot leak into the sums
    return torch.where(mask, -token_nll, 0.0).sum(dim=1, dtype=torch.float64)


def nll_pass(
    model,
    tokenizer,
    texts: list[str],
    *,
    batch_size: int,
    max_length: int,
    device,
    on_batch: Callable[[int, int], None] = lambda samples, tokens: None,
) -> NllResult:
    """Teacher-forced NLL of each text, batched and tokenized exactly as ingest does."""
    started = time.perf_counter()
    vocab = model.get_input_embeddings().weight.shape[0]
    inputs, n_truncated = scoring.batches(tokenizer, texts, batch_size=batch_size, max_length=max_length, vocab=vocab)
    nll = [0.0] * len(texts)
    n_tokens = [0] * len(texts)
    with torch.inference_mode():
        for batch in inputs:
            input_ids, attention = batch.input_ids.to(device), batch.attention.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
            sums = _row_nll(logits, input_ids, attention).tolist()
            del logits  # free this batch's logits before the next forward
            lengths = batch.attention.sum(dim=1).tolist()
            for row, item in enumerate(batch.items):
                nll[item] = sums[row]
                n_tokens[item] = lengths[row] - 1
            on_batch(len(batch.items), int(sum(lengths)))
    return NllResult(nll, n_tokens, n_truncated, time.perf_counter() - started)


def _pad_id(tokenizer, vocab: int) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None and 0 <= candidate < vocab:
            return candidate
    return 0  # padded positions are masked out


def _eos_ids(model, tokenizer) -> list[int]:
    """The model's end-of-sequence ids (chat models list their end-of-turn token there) and the tokenizer's."""
    found = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, torch.Tensor):
        configured = configured.tolist()
    for value in (configured if isinstance(configured, (list, tuple)) else [configured]) + [tokenizer.eos_token_id]:
        if value is not None and value not in found:
            found.append(int(value))
    return found


class _StopStrings:
    """Stopping criterion: a row is done once its generated text (not the prompt) holds a stop string."""

    def __init__(self, tokenizer, stops, prompt_width: int):
        self.tokenizer, self.stops, self.start = tokenizer, tuple(stops), prompt_width
        self.window = 8 + max(len(s) for s in self.stops)  # tokens, each >= 1 character of a stop
        self.done: list[bool] | None = None

    def _holds_stop(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(stop in text for stop in self.stops)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.start :].tolist()
        if self.done is None:
            self.done = [False] * len(generated)
        for row, ids in enumerate(generated):
            # a cheap look at the last tokens first; the full decode confirms, so it never stops early
            if not self.done[row] and self._holds_stop(ids[-self.window :]) and self._holds_stop(ids):
                self.done[row] = True
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def _stopping_criteria(tokenizer, stops, prompt_width: int):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(_StopStrings, StoppingCriteria):
        pass

    return StoppingCriteriaList([StopStrings(tokenizer, stops, prompt_width)])


def _kept(tokenizer, ids: list[int], eos: set[int], stops) -> tuple[str, int]:
    """The completion (decoded up to the first eos, cut at the stops) and how many tokens it kept."""
    end = next((k for k, token in enumerate(ids) if token in eos), len(ids))
    ids = ids[:end]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    completion = answers.cut(text, stops)
    if completion == text:
        return completion, end
    # the shortest prefix holding a stop: binary search (holding a stop only grows with the prefix)
    low, high = 1, end
    while low < high:
        mid = (low + high) // 2
        prefix = tokenizer.decode(ids[:mid], skip_special_tokens=True)
        if answers.cut(prefix, stops) != prefix:
            high = mid
        else:
            low = mid + 1
    return completion, low


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    max_length: int,
    device,
    add_special_tokens: bool = True,
    stops=answers.STOPS,
    on_batch: Callable[[int, int], None] = lambda samples, tokens: None,
) -> GenerationResult:
    """Greedy completions of `prompts`: length-sorted, left-padded batches with the KV cache.

    Pure greedy: the checkpoint's generation_config (sampling, repetition penalty, ...) is
    ignored for the call; only its eos ids are kept. `on_batch` gets generated tokens kept."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    hf_logging.set_verbosity_error()  # as ingest: silence "sequence longer than model max" warnings
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = [list(seq) for seq in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    for i, seq in enumerate(ids):  # every check before any generation
        if not seq:
            raise MlarchError(f"prompt {i} tokenizes to nothing; remove empty items from the data")
        if len(seq) > max_length:
            raise error(
                MlarchError, f"prompt {i} has {len(seq)} tokens, more than the maximum of {max_length}: "
                "pass a larger ", Arg("max_length"), " or fewer ", Arg("shots")
            )
        if max(seq) >= vocab:
            raise MlarchError(
                f"the tokenizer produced id {max(seq)} but the model's embedding has {vocab} rows: "
                "tokenizer and model do not match"
            )
    pad = _pad_id(tokenizer, vocab)
    eos = _eos_ids(model, tokenizer)
    completions = [""] * len(prompts)
    n_tokens = [0] * len(prompts)
    saved = model.generation_config
    # generate() fills unset options from model.generation_config: a blank one keeps decoding greedy
    model.generation_config = GenerationConfig()
    try:
        for batch in scoring.length_batches([len(s) for s in ids], batch_size):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every row's next token is at the end
                input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                attention[row, width - len(ids[i]) :] = 1
            with torch.inference_mode():
                # generate() derives position ids from the attention mask (cumsum), so left
                # padding does not shift the real tokens' positions
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos or None,
                    pad_token_id=pad,
                    use_cache=True,
                    stopping_criteria=_stopping_criteria(tokenizer, stops, width) if stops else None,
                )
            generated = out[:, width:].tolist()
            kept = 0
            for row, i in enumerate(batch):
                completions[i], n_tokens[i] = _kept(tokenizer, generated[row], set(eos), stops)
                kept += n_tokens[i]
            on_batch(len(batch), kept)
    finally:
        model.generation_config = saved
    return GenerationResult(completions, n_tokens, time.perf_counter() - started)


def build_prompt(exemplars: list[tuple[str, str]], question: str, *, chat: bool, tokenizer=None) -> str:
    """A few-shot prompt: plain "Q: ...\\nA: ..." blocks, or the tokenizer's chat template with
    user/assistant turns (tokenize that with add_special_tokens=False: the template holds them)."""
    if not chat:
        shots = "\n\n".join(f"Q: {q}\nA: {a}" for q, a in exemplars)
        return (shots + "\n\n" if exemplars else "") + f"Q: {question}\nA:"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise error(MlarchError, "the tokenizer of this model has no chat template: drop ", Arg("chat"))
    messages = []
    for q, a in exemplars:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
