"""Evaluation building blocks: answer reading, teacher-forced NLL and batched greedy generation,
each checked against an independent one-item-at-a-time reference."""

from __future__ import annotations

import pytest
import torch

from fixtures import math_items, prose_items
from mlarch.errors import MlarchError
from mlarch.evaluation import answers, tasks

# ---------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,234", "1234"),
        ("1,234,567", "1234567"),
        ("3,4", "4"),  # not a thousands group: two numbers, the last wins
        ("12,34", "34"),
        ("1,2345", "2345"),
        ("-5", "-5"),
        ("it is -5 degrees", "-5"),
        ("5-3", "3"),  # a minus after a digit is an operator
        ("x-5", "5"),
        ("-0", "0"),
        ("3.50", "3.5"),
        ("18.0", "18"),
        ("0.5", "0.5"),
        (".5", "0.5"),  # choice: a leading-dot decimal reads as 0.5
        ("42.", "42"),  # a trailing period is punctuation
        ("The answer is 1,234.", "1234"),
        ("The Answer Is 7. Then 9 more.", "7"),  # first number after the last "answer is"
        ("the answer is 3, so answer is 8 then 10", "8"),
        ("so 48/2 = 24 apples\n#### 72", "72"),
        ("#### 5 and then 6", "5"),
        ("a #### 1 b #### 2", "2"),
        ("He had 3 apples, then 5, then 12.", "12"),
        ("no number here", None),
        ("####", None),
        ("", None),
        ("$1,000.50", "1000.5"),
        ("It costs $18.00 in total", "18"),
        ("১২টি", "12"),  # Bengali digits read as ASCII
        ("180", "180"),  # no exponent form from normalisation
        ("123456789012345678901234567890123", "123456789012345678901234567890123"),  # no rounding
    ],
)
def test_extract(text, expected):
    assert answers.extract(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("1,234", "1234"), ("-3.50", "-3.5"), ("-0.0", "0"), ("$72", "72"), ("abc", None), ("4 and 5", "4")],
)
def test_number(text, expected):
    assert answers.number(text) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),  # GSM8K
        ("She pays 2 * 500 = 1,000 dollars.\n#### 1,000", "1000"),
        ("It makes 72.\n#### 72 (in 3 boxes)", "72"),  # after "####", not the last number
        ("18", "18"),  # MGSM
        ("-4", "-4"),
        ("Ana starts with 2 apples, 2 + 1 = 3. The answer is 3.", "3"),  # fixture style: last number
        ("no answer", None),
    ],
)
def test_reference(answer, expected):
    assert answers.reference(answer) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" 5 apples.\n\nQ: next", " 5 apples."),
        (" 5 apples.\nQ: next\n\n", " 5 apples."),
        (" a\nb\n\nc", " a\nb"),
        (" 5\nA: 6", " 5\nA: 6"),
        ("", ""),
    ],
)
def test_cut(completion, expected):
    assert answers.cut(completion) == expected


def test_correct():
    assert answers.correct("72", answers.reference("#### 72"))
    assert not answers.correct(None, None)
    assert not answers.correct("7", "72")
    assert answers.correct(answers.extract("The answer is 1,000.00."), answers.reference("#### 1000"))


# ---------------------------------------------------------------- models


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = {}

    def load(kind, sharp=False):
        if (kind, sharp) not in cache:
            model = AutoModelForCausalLM.from_pretrained(model_dir[kind], dtype=torch.float32).eval()
            if sharp:  # tiny random gpt2 repeats one token whatever the prompt: scaled, its output depends on it
                with torch.no_grad():
                    for param in model.parameters():
                        if param.dim() == 2:
                            param.mul_(6.0)
            cache[kind, sharp] = model, AutoTokenizer.from_pretrained(model_dir[kind])
        return cache[kind, sharp]

    return load


def _record_masks(model):
    """Attention masks of every forward of `model`, (handle, list)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs["input_ids"].shape[1], kwargs["attention_mask"].clone()))

    return model.register_forward_pre_hook(hook, with_kwargs=True), seen


def _texts(one_token: str) -> list[str]:
    # lengths all over the place, unsorted, and one text of a single token
    items = math_items("en", 4) + math_items("de", 2)
    texts = [f"Q: {m['question']}\nA: {m['answer']}" for m in items] + prose_items("bn")[:3] + prose_items("en")[:3]
    texts.insert(3, one_token)
    texts.insert(7, "Q: 7")
    return texts


def _reference_nll(model, tokenizer, text, max_length):
    ids = tokenizer(text)["input_ids"][:max_length]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    target = torch.tensor(ids[1:])
    return float(-logp[:-1].gather(-1, target[:, None]).sum()), len(ids) - 1


ONE_TOKEN = {"llama": "", "gpt2": "Q"}  # llama adds a BOS, gpt2 adds nothing


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("max_length", [256, 12])
def test_nll_pass_matches_reference(loaded, kind, max_length):
    model, tokenizer = loaded(kind)
    texts = _texts(ONE_TOKEN[kind])
    assert len(tokenizer(ONE_TOKEN[kind])["input_ids"]) == 1
    handle, seen = _record_masks(model)
    calls = []
    try:
        result = tasks.nll_pass(model, tokenizer, texts, batch_size=3, max_length=max_length, device="cpu",
                                on_batch=lambda samples, tokens: calls.append((samples, tokens)))
    finally:
        handle.remove()
    # padding really happened: some batch holds rows of different real lengths
    assert any(len(set(mask.sum(dim=1).tolist())) > 1 for _, mask in seen)
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert result.n_truncated == sum(n > max_length for n in lengths)
    if max_length < 256:
        assert result.n_truncated > 0
    assert len(result.nll) == len(result.n_tokens) == len(texts)
    for i, text in enumerate(texts):
        expected, n = _reference_nll(model, tokenizer, text, max_length)
        assert result.n_tokens[i] == n, i
        assert result.nll[i] == pytest.approx(expected, rel=1e-5, abs=1e-9), i
    assert result.nll[3] == 0.0 and result.n_tokens[3] == 0
    assert sum(s for s, _ in calls) == len(texts)
    assert sum(t for _, t in calls) == sum(min(n, max_length) for n in lengths)


@pytest.mark.parametrize("rows", [1, 0])  # blocks of one row; blocks of 5 positions within a row
def test_nll_pass_in_small_blocks(loaded, monkeypatch, rows):
    model, tokenizer = loaded("llama")
    texts = _texts("")
    whole = tasks.nll_pass(model, tokenizer, texts, batch_size=3, max_length=256, device="cpu")
    monkeypatch.setattr(tasks, "_block", lambda logits: rows * logits.shape[1] * logits.shape[2] or 5 * logits.shape[2])
    small = tasks.nll_pass(model, tokenizer, texts, batch_size=3, max_length=256, device="cpu")
    assert small.n_tokens == whole.n_tokens
    assert small.nll == pytest.approx(whole.nll, rel=1e-6)


# ---------------------------------------------------------------- generation


def _prompts() -> list[str]:
    items = math_items("en", 6)
    shots = [(m["question"], m["answer"].split(". ")[-1]) for m in items[:3]]  # "The answer is N."
    # 0, 3, 1, 2, 0, 1 shots: token lengths differ by whole exemplars
    return [tasks.build_prompt(shots[:k], items[3 + j % 3]["question"], chat=False)
            for j, k in enumerate([0, 3, 1, 2, 0, 1])]


_GREEDY: dict = {}  # (model, prompt, max_new_tokens) -> generated ids: the same for every stop set


def _reference_generate(model, tokenizer, prompt, max_new_tokens, stops):
    """One prompt alone, no padding, transformers' greedy decoding, then our cut rules."""
    eos = tokenizer.eos_token_id
    key = (id(model), prompt, max_new_tokens)
    if key not in _GREEDY:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
        _GREEDY[key] = out[0, ids.shape[1]:].tolist()
    generated = _GREEDY[key]
    if eos in generated:
        generated = generated[: generated.index(eos)]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    kept = len(generated)
    for k in range(1, len(generated) + 1):  # the token completing the first stop is the last kept
        if any(stop in tokenizer.decode(generated[:k], skip_special_tokens=True) for stop in stops):
            kept = k
            break
    return answers.cut(text, stops), kept


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("early", [False, True])
def test_generate_matches_unbatched_greedy(loaded, kind, early):
    model, tokenizer = loaded(kind, sharp=kind == "gpt2")
    prompts = _prompts()
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) >= 4
    max_new = 12
    free = [_reference_generate(model, tokenizer, p, max_new, ())[0] for p in prompts]
    assert len(set(free)) >= 3  # outputs depend on the prompt, so a shifted position shows
    stops = answers.STOPS
    if early:  # stop strings every row meets early: a visible ASCII character a third into its free output
        stops = tuple({next(c for c in text[len(text) // 3 :] if c.isascii() and c.isprintable()) for text in free})
    side, config = tokenizer.padding_side, model.generation_config
    handle, seen = _record_masks(model)
    try:
        result = tasks.generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=max_new, max_length=256,
                                device="cpu", stops=stops)
    finally:
        handle.remove()
    prefills = [mask for width, mask in seen if width > 1]
    assert len(prefills) == 2  # 6 prompts in batches of 4
    # left padding really happened: every row ends on a real token, some row starts on padding
    assert all(bool(mask[:, -1].all()) for mask in prefills)
    assert any(bool((mask[:, 0] == 0).any()) for mask in prefills)
    assert tokenizer.padding_side == side and model.generation_config is config  # nothing left changed
    for i, prompt in enumerate(prompts):
        completion, kept = _reference_generate(model, tokenizer, prompt, max_new, stops)
        assert result.completions[i] == completion, i
        assert result.n_tokens[i] == kept, i
    if early:
        # every row stopped early, so generation ended before max_new_tokens steps
        assert all(n < max_new for n in result.n_tokens)
        assert len(seen) < 2 * max_new


def test_generate_ignores_checkpoint_sampling_settings(loaded):
    model, tokenizer = loaded("llama")
    prompts = _prompts()[:3]
    plain = tasks.generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=8, max_length=256, device="cpu")
    config = model.generation_config
    changed = config.__class__.from_dict(config.to_dict())
    changed.update(do_sample=True, temperature=5.0, repetition_penalty=50.0, no_repeat_ngram_size=1)
    model.generation_config = changed
    try:
        again = tasks.generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=8, max_length=256, device="cpu")
    finally:
        model.generation_config = config
    assert again.completions == plain.completions


def test_generate_checks_lengths_before_generating(loaded):
    model, tokenizer = loaded("llama")
    prompts = _prompts()
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    limit = sorted(lengths)[-2]  # the longest prompt is over it; it sorts last, so would run last
    handle, seen = _record_masks(model)
    try:
        with pytest.raises(MlarchError) as caught:
            tasks.generate(model, tokenizer, prompts, batch_size=1, max_new_tokens=4, max_length=limit, device="cpu")
    finally:
        handle.remove()
    longest = lengths.index(max(lengths))
    message = str(caught.value)
    assert f"prompt {longest} " in message and str(max(lengths)) in message and "\n" not in message
    assert message.endswith(": pass a larger max_length= or fewer shots=")
    assert not seen


def test_build_prompt(model_dir):
    from transformers import AutoTokenizer

    assert tasks.build_prompt([], "Why?", chat=False) == "Q: Why?\nA:"
    assert tasks.build_prompt([("1+1?", "2"), ("2+2?", "4")], "3+3?", chat=False) == \
        "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4\n\nQ: 3+3?\nA:"
    tokenizer = AutoTokenizer.from_pretrained(model_dir["gpt2"])
    with pytest.raises(MlarchError, match="no chat template: drop chat="):
        tasks.build_prompt([("1+1?", "2")], "3+3?", chat=True, tokenizer=tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert tasks.build_prompt([("1+1?", "2")], "3+3?", chat=True, tokenizer=tokenizer) == \
        "<user>1+1?\n<assistant>2\n<user>3+3?\n<assistant>"
