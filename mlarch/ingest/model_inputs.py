"""The files of a model folder that transformers reads besides its weights, config and the
top-level tokenizer files mlarch digests (loading._model_files), and the folders that would
make it read a file no digest covers. Each is refused before any load, from the folder's
listing and two small JSON files: cheap enough for every ingest and evaluation.

Measured under transformers 5.24 (tests/test_trust_inputs.py), where loading.load calls
AutoTokenizer and AutoModelForCausalLM on the folder without remote code."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from mlarch.errors import MlarchError

# Vocabulary files a tokenizer class of transformers reads by name from the folder's top level
# (every VOCAB_FILES_NAMES of transformers 5.24, and the names it falls back to: tekken.json,
# tokenizer.model, tiktoken.model), and tokenizer_config.json. Digested where their suffix is not
# one loading._MODEL_FILE_SUFFIXES digests anyway (PhoBERT's bpe.codes, Marian's .spm files...);
# next to a GGUF file, each replaces the GGUF's own tokenizer (refused).
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tekken.json", "tiktoken.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "sentencepiece.model",
    "spm.model", "spm_char.model", "entity_vocab.json", "bpe.codes", "word_shape.json", "word_pronunciation.json",
    "vocab-src.json", "vocab-tgt.json", "target_vocab.json", "source.spm", "target.spm", "prophetnet.tokenizer",
    "normalizer.json", "emoji.json", "dict.txt", "byte_maps.json",
})
# transformers reads every *.jinja file of this folder as a named chat template; one named
# default.jinja replaces chat_template.jinja as the template that --chat applies
CHAT_TEMPLATE_DIR = "additional_chat_templates"
ADAPTER_CONFIG = "adapter_config.json"
# without these (and without peft), transformers leaves a stale adapter_config.json alone
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# tokenizer_config.json keys that transformers always replaces by the folder's own file (or None)
_REPLACED_KEYS = frozenset({"tokenizer_file", "added_tokens_file", "special_tokens_map_file",
                            "tokenizer_config_file", "chat_template_file"})
_FAST_TOKENIZER_FILE = re.compile(r"tokenizer\.(.*)\.json")  # transformers' own pattern, searched


def plain_name(name) -> bool:
    """Whether `name` is a file name in a folder itself: no folder, no `..`, not absolute."""
    return (isinstance(name, str) and name.isprintable() and name not in ("", ".", "..")
            and "/" not in name and "\\" not in name and not os.path.isabs(name))


def config_dict(folder: Path) -> dict | None:
    """config.json as transformers resolves it (None: absent or unreadable, which the load
    reports): where it lists `configuration_files`, transformers reads the one for its version
    instead, so those must be files next to it (digested with the model files, as config.json)."""
    try:
        config = json.loads((folder / "config.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict) or "configuration_files" not in config:
        return config if isinstance(config, dict) else None
    entries = config["configuration_files"]
    if not isinstance(entries, list) or not all(plain_name(e) for e in entries):
        raise MlarchError(f"model folder {folder}'s config.json names configuration files {shown(entries)} "
                          "(configuration_files) that are not files next to it: remove the key and keep the config "
                          "in config.json")
    from transformers import PreTrainedConfig

    try:
        resolved, _ = PreTrainedConfig.get_config_dict(str(folder), local_files_only=True)
    except Exception:  # the load reports it
        return None
    return resolved if isinstance(resolved, dict) else None


def chat_templates(folder: Path) -> list[Path]:
    """The chat template files transformers reads from the folder's additional_chat_templates/."""
    templates = folder / CHAT_TEMPLATE_DIR
    if not templates.is_dir():
        return []
    return sorted(f for f in templates.glob("*.jinja") if f.is_file())


def check(folder: Path, covered: list[Path], gguf: str | None = None) -> None:
    """Refuse a folder that would make transformers read a file that is not in `covered` (the
    files the weights digest and the model files' digests cover): a PEFT adapter, tokenizer
    files next to a GGUF file (`gguf`: its name), tokenizer_config.json naming files
    elsewhere, config.json asking for an attention kernel from the Hub."""
    if (folder / ADAPTER_CONFIG).is_file() and (any((folder / name).is_file() for name in ADAPTER_WEIGHTS)
                                                 or importlib.util.find_spec("peft") is not None):
        raise MlarchError(
            f"model folder {folder} holds a PEFT adapter ({ADAPTER_CONFIG}), which transformers applies to the weights "
            "only where the peft library is installed, and then loads the base model its base_model_name_or_path "
            "names when the folder has no config.json: merge the adapter into the model (peft's merge_and_unload, "
            "then save_pretrained) and pass that folder")
    if gguf is not None:
        _check_gguf_neighbours(folder, gguf)
        return
    covered_paths = {os.path.realpath(p) for p in covered}
    _check_tokenizer_config(folder, covered_paths)
    _check_attention(folder)


def _check_gguf_neighbours(folder: Path, gguf: str) -> None:
    found = sorted(n for n in TOKENIZER_FILES if (folder / n).is_file())
    found += [f"{CHAT_TEMPLATE_DIR}/{t.name}" for t in chat_templates(folder)]
    if found:
        listed = ", ".join(shown(n) for n in found[:3]) + (", ..." if len(found) > 3 else "")
        raise MlarchError(
            f"the folder {folder} of {shown(gguf)} also holds tokenizer files ({listed}), which transformers reads "
            "instead of the GGUF file's own tokenizer: put the .gguf file in a folder of its own and pass it there")


def _json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None  # absent or unreadable: transformers reports it


def _check_tokenizer_config(folder: Path, covered: set[str]) -> None:
    config = _json(folder / "tokenizer_config.json")
    if not isinstance(config, dict):
        return
    where = f"model folder {folder}'s tokenizer_config.json"
    fix = ("remove the key from tokenizer_config.json and keep the tokenizer's files in the folder itself under "
           "their usual names")
    # transformers loads the entry of fast_tokenizer_files for its version instead of tokenizer.json,
    # wherever it points (a subfolder, `..`, an absolute path)
    entries = config.get("fast_tokenizer_files")
    for name in entries if isinstance(entries, (list, tuple, dict)) else ():
        if not isinstance(name, str) or not _FAST_TOKENIZER_FILE.search(name):
            continue  # transformers skips it (or fails on it)
        plain = "/" not in name and "\\" not in name and name not in ("", ".", "..") and not os.path.isabs(name)
        if not plain or ((folder / name).exists() and os.path.realpath(folder / name) not in covered):
            raise MlarchError(f"{where} names the tokenizer file {shown(name)} (fast_tokenizer_files), which is "
                              f"not a file next to it that mlarch digests: {fix}")
    # a vocabulary file the tokenizer class does not list (Gemma's vocab_file, any class's
    # merges_file, a vocab or merges given as a path) is opened as written: relative to the
    # working directory, or absolute
    replaced = _REPLACED_KEYS | set(_vocab_files_names(config.get("tokenizer_class")))
    for key, value in config.items():
        if not (isinstance(key, str) and isinstance(value, str)) or key in replaced:
            continue
        if (key in ("vocab", "merges") or key.endswith("_file")) and os.path.isfile(value) \
                and os.path.realpath(value) not in covered:
            raise MlarchError(f"{where} names the file {shown(value)} ({key}), which transformers reads though "
                              f"it is not a file of the folder that mlarch digests: {fix}")


def _vocab_files_names(name) -> dict:
    """The file keys transformers' tokenizer class `name` replaces with the folder's own files
    ({} for a class it does not know: every key is then checked)."""
    try:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        names = getattr(tokenizer_class_from_name(name), "vocab_files_names", None) if isinstance(name, str) else None
    except Exception:  # an unknown or malformed class name: the load reports it
        return {}
    return names if isinstance(names, dict) else {}


def _check_attention(folder: Path) -> None:
    """An attention implementation named as a Hub repository (kernels-community/flash-attn2):
    transformers downloads and runs that kernel (with the kernels library installed)."""
    config = config_dict(folder)  # the file transformers reads (configuration_files)
    for value in _attention_values(config, 0):
        if "/" in value:
            raise MlarchError(
                f"model folder {folder}'s config.json asks for the attention kernel {shown(value)} from the Hugging "
                "Face Hub (attn_implementation), code and files outside the folder that mlarch does not digest: "
                "remove the key from config.json")


def _attention_values(config, depth: int):
    """The strings config.json gives as attn_implementation (or _attn_implementation), a
    sub-config's too (to depth 3), and the values of such a setting given per sub-config."""
    if not isinstance(config, dict) or depth > 3:
        return
    for key, value in config.items():
        if key in ("attn_implementation", "_attn_implementation"):
            values = value.values() if isinstance(value, dict) else [value]
            yield from (v for v in values if isinstance(v, str))
        elif isinstance(value, dict):
            yield from _attention_values(value, depth + 1)


def shown(value) -> str:
    """An untrusted name (or other value) as one printable line, short."""
    return repr(value)[:120] if isinstance(value, str) and value.isprintable() else ascii(value)[:120]
