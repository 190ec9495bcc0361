"""`mlarch ingest` as a process vs a process that only imports, loads and runs the forward passes.

Issue 16's end-to-end target: an ingest of a small run costs at most 1.05x a separate
Python process that imports torch and transformers, loads the same model and runs the same
forward passes at batch 1. Both sides are fresh processes timed from outside (start-up,
imports and model load included, as a user waits for them):

* ours: `mlarch --archive FRESH ingest --model FOLDER --langs en --math starter
  --control starter --samples N --device cpu --quiet` (math + control runs, selection at the
  paper's 7 k, zarr writes with digests, derive, the catalog commit; the weight files'
  sha256 comes from the digest cache after the first round, as for every ingest of a model
  after its first);
* baseline: `python -c BASELINE FOLDER IDS.json`, which imports torch and transformers,
  loads the model with `AutoModelForCausalLM.from_pretrained` in float32 and forwards the
  very token ids ingest forwards (written by this script with ingest's own
  `scoring.batches`, so the baseline does not even tokenize) through the base model (the
  scoring pass stops at the head's input), batch 1, under `torch.inference_mode()`.

The model is a Llama with random weights (default ~50 M parameters: 16 blocks, hidden 512,
MLP 1536, the tests' byte-level tokenizer), saved once as safetensors under the cache.

    .venv/bin/python bench/ingest_process.py [--quick] [--samples 48] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _common
from _common import Bench, drawn, interleave, median, starter_texts

TARGET = 1.05

BASELINE = r"""
import json, sys
import torch, transformers
folder, ids_file = sys.argv[1], sys.argv[2]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
model.eval()
base = getattr(model, model.base_model_prefix)
with open(ids_file) as f:
    passes = json.load(f)
with torch.inference_mode():
    for ids in passes:
        x = torch.tensor([ids], dtype=torch.long)
        base(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
"""


def llama_folder(layers: int) -> Path:
    """A random Llama of `layers` blocks (hidden 512, MLP 1536, 8 heads / 4 kv), built once."""
    from fixtures import build_model

    from mlarch.cache import cache_dir

    folder = cache_dir() / "bench" / f"llama-random-{layers}"
    if not (folder / "tiny-llama" / "config.json").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build_model("llama", partial, layers=layers, hidden_size=512, intermediate_size=1536,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return folder / "tiny-llama"


def token_ids(folder: Path, lang: str, samples: int) -> list[list[int]]:
    """The ids of every forward pass ingest makes (math, then control), via ingest's own batching."""
    from transformers import AutoTokenizer

    from mlarch.ingest.scoring import batches

    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    out = []
    for role in ("math", "control"):
        texts = drawn(starter_texts(lang, role), samples, seed=1)
        inputs, _ = batches(tokenizer, texts, batch_size=1, max_length=512, vocab=vocab)
        out += [b.input_ids[0].tolist() for b in inputs]
    return out


def main() -> None:
    bench = Bench("ingest_process", __doc__, repeats=3, quick_repeats=1, torch_threads=False, extra_args=lambda p: (
        p.add_argument("--samples", type=int, default=None, help="samples per role (default 48; --quick 4)"),
        p.add_argument("--layers", type=int, default=16, help="Llama blocks (16: ~50 M parameters)"),
        p.add_argument("--lang", default="en"),
    ))
    samples = bench.args.samples or (4 if bench.quick else 48)
    folder = llama_folder(bench.args.layers)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-process-"))
    ids_file = work / "ids.json"
    passes = token_ids(folder, bench.args.lang, samples)
    ids_file.write_text(json.dumps(passes))
    mlarch_bin = str(Path(sys.executable).with_name("mlarch"))
    env = {**os.environ, "MLARCH_CACHE": str(work / "cache")}
    # mlarch starts from its bytecode cache, as on a user's machine and as torch and transformers
    # do here (these hosts' shells set the variable: an editable mlarch compiled ~0.18 s per start)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    counter = [0]

    def run(argv: list[str]) -> None:
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{argv[:3]} failed ({done.returncode}):\n{done.stderr[-2000:]}")

    def ours():
        counter[0] += 1
        root = work / f"archive-{counter[0]}"
        run([mlarch_bin, "--archive", str(root), "ingest", "--model", str(folder), "--langs", bench.args.lang,
             "--math", "starter", "--control", "starter", "--samples", str(samples), "--device", "cpu", "--quiet"])
        shutil.rmtree(root, ignore_errors=True)

    def baseline():
        run([sys.executable, "-c", BASELINE, str(folder), str(ids_file)])

    try:
        bench.log(f"{len(passes)} forward passes ({samples} samples per role), {bench.repeats} rounds")
        ours()  # warm the page cache and the digest cache for both sides alike
        baseline()
        times = interleave({"mlarch ingest": ours, "import + load + forward": baseline}, bench.repeats, log=bench.log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = _common.bad_rounds("mlarch ingest", "import + load + forward")
    ratio = _common.paired_ratio(times["mlarch ingest"], times["import + load + forward"], bad)
    a, b = median(_common.clean(times["mlarch ingest"], bad)), median(_common.clean(times["import + load + forward"], bad))
    bench.row(f"ingest process vs import + load + forward, {samples} samples/role", a, b, ratio=ratio,
              target=f"<= {TARGET}x", passed=ratio <= TARGET, samples_ours=times["mlarch ingest"],
              samples_baseline=times["import + load + forward"])
    bench.finish(details={"model": str(folder), "layers": bench.args.layers, "samples_per_role": samples,
                          "forward_passes": len(passes), "tokens": sum(len(p) for p in passes)})


if __name__ == "__main__":
    main()
