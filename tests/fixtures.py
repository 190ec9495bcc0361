"""Tiny transformers models built from a config, with tokenizers trained in code, and
small multilingual data files. Everything here runs offline in well under a second."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mlarch.ingest.units import Reporter

LANGS = ("en", "de", "bn")
VOCAB = 384  # room above the trained vocabulary for tokens a tokenizer class may add

_MATH = {
    "en": ("If Ana has {a} apples and buys {b} more, how many apples does she have?",
           "Ana starts with {a} apples. She buys {b} more, so {a} + {b} = {c}. The answer is {c}."),
    "de": ("Wenn Ana {a} Äpfel hat und {b} weitere kauft, wie viele Äpfel hat sie?",
           "Ana hat zuerst {a} Äpfel. Sie kauft {b} dazu, also {a} + {b} = {c}. Die Antwort ist {c}."),
    "bn": ("আনার {a}টি আপেল আছে এবং সে আরও {b}টি কেনে, তার কতগুলি আপেল আছে?",
           "আনার প্রথমে {a}টি আপেল ছিল। সে {b}টি কেনে, তাই {a} + {b} = {c}। উত্তর হল {c}।"),
}
_PROSE = {
    "en": ["The river runs slowly through the old town in spring.",
           "Many birds return to the northern forests each year.",
           "The library opens early on weekdays and closes at night.",
           "Farmers in the valley grow rice, beans and sweet potatoes.",
           "A small boat crossed the lake while the sun was setting."],
    "de": ["Der Fluss fließt im Frühling langsam durch die Altstadt.",
           "Viele Vögel kehren jedes Jahr in die nördlichen Wälder zurück.",
           "Die Bibliothek öffnet werktags früh und schließt am Abend.",
           "Die Bauern im Tal bauen Reis, Bohnen und Süßkartoffeln an.",
           "Ein kleines Boot überquerte den See, als die Sonne unterging."],
    "bn": ["বসন্তে নদীটি পুরনো শহরের মধ্য দিয়ে ধীরে প্রবাহিত হয়।",
           "অনেক পাখি প্রতি বছর উত্তরের বনে ফিরে আসে।",
           "গ্রন্থাগারটি সপ্তাহের দিনে সকালে খোলে এবং রাতে বন্ধ হয়।",
           "উপত্যকার কৃষকেরা ধান, শিম এবং মিষ্টি আলু চাষ করে।",
           "সূর্য ডোবার সময় একটি ছোট নৌকা হ্রদ পার হল।"],
}


def math_items(lang: str, n: int = 10) -> list[dict]:
    q, a = _MATH[lang]
    return [{"question": q.format(a=i + 2, b=3 * i + 1), "answer": a.format(a=i + 2, b=3 * i + 1, c=4 * i + 3)}
            for i in range(n)]


def prose_items(lang: str) -> list[str]:
    lines = _PROSE[lang]
    return [f"{lines[i % len(lines)]} {lines[(i + 2) % len(lines)]}" for i in range(8)]


def write_data(folder: Path) -> tuple[str, str]:
    """math/{lang}.jsonl and control/{lang}.txt for every fixture language; returns templates."""
    for lang in LANGS:
        (folder / "math").mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        with open(folder / "math" / f"{lang}.jsonl", "w", encoding="utf-8") as handle:
            for item in math_items(lang):
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
        (folder / "control" / f"{lang}.txt").write_text("\n".join(prose_items(lang)) + "\n", encoding="utf-8")
    return str(folder / "math" / "{lang}.jsonl"), str(folder / "control" / "{lang}.txt")


def _corpus() -> list[str]:
    texts = []
    for lang in LANGS:
        texts += [f"Q: {m['question']}\nA: {m['answer']}" for m in math_items(lang)]
        texts += prose_items(lang)
    return texts


def build_tokenizer(with_pad: bool, with_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>"] + (["<pad>"] if with_pad else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    kwargs = {"bos_token": "<s>", "eos_token": "</s>"}
    if with_pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def build_model(kind: str, folder: Path, layers: int = 2, **sizes) -> Path:
    """Save a tiny random model of `kind` ('llama' | 'qwen2' | 'gpt2'), `layers` blocks deep, with its tokenizer.
    `sizes` override config fields (e.g. hidden_size=576) for a bigger model of the same kind."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed({"llama": 1, "qwen2": 2, "gpt2": 3}[kind])
    tokenizer = build_tokenizer(with_pad=kind != "gpt2", with_bos=kind == "llama")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if kind == "llama":  # untied lm_head: scored
        make, fields = LlamaConfig, dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=False, **ids)
    elif kind == "qwen2":  # lm_head tied to the embedding: not scored
        make, fields = Qwen2Config, dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True, **ids)
    elif kind == "gpt2":  # Conv1D modules, learned positions, no pad token
        make, fields = GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=256, **ids)
    else:
        raise ValueError(kind)
    config = make(**{**fields, **sizes})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init leaves norms' weights at 1: perturb so every module matters
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    path = folder / f"tiny-{kind}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_error(result, code: int) -> str:
    """The single `Error: ...` line of a CLI result that exited with `code` (no traceback,
    not the CLI's catch-all for unexpected exceptions)."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert not lines[0].startswith("Error: unexpected "), lines[0]
    return lines[0]


class RecordingReporter(Reporter):
    """An ingest/eval reporter that keeps the status lines it is given."""

    def __init__(self):
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)
