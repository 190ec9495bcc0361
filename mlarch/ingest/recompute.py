"""`verify --recompute`: rerun one run's scoring from its recorded provenance and compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlarch.errors import MlarchError
from mlarch import methods, selection
from mlarch.ingest import loading, provenance, sources
from mlarch.ingest.datafiles import parse_records
from mlarch.ingest.scoring import run_pass, scored_modules


def _texts(prov: dict) -> list[str]:
    data, config = prov["data"], prov["config"]
    named = data["source"].get("kind") == "named"
    if named:
        items = sources.resolve(data["source"]["name"], Path(config["data_dir"]) if config.get("data_dir") else None)
        loaded = items.load(data["lang"], data["role"])
        texts = loaded.texts
    elif data["source"].get("kind") == "hub":  # the same commit, the same file digests
        from mlarch.ingest.hub_data import pinned

        loaded = pinned(data["source"]).load(data["lang"], data["role"])
        if loaded.files != data["files"]:
            raise MlarchError("the hub data set's files differ from the run's (sha256): its cache was changed; "
                              "delete the data set from the cache to fetch it again")
        texts = loaded.texts
    else:
        (path, digest), = data["files"].items()
        if not Path(path).is_file():
            raise MlarchError(f"the run's data file {path} is gone: restore it to recompute")
        if sources.sha256_file(Path(path)) != digest:
            raise MlarchError(f"the run's data file {path} changed since the run (sha256 differs)")
        texts, _, _ = parse_records(Path(path), data["source"].get("text_template", "default"))
    drawn = [texts[i] for i in prov["sample_indices"]]
    if provenance.texts_digest(drawn) != prov["texts_sha256"]:
        raise MlarchError("the texts rebuilt from the provenance differ from the run's (texts_sha256 mismatch)")
    return drawn


def recompute(archive, run_id: str, device: str = "auto") -> list[dict]:
    """Rows (metric, value) comparing a fresh scoring pass with the archived run."""
    run = archive.run(run_id)
    prov = run["provenance"]
    if run["status"] != "FINISHED" or not prov:
        raise MlarchError(f"run {run_id} has not finished: nothing to recompute")
    config, model = prov["config"], prov["model"]
    texts = _texts(prov)
    target = loading.resolve_device(device)
    opts = loading.options(config)
    if device != "auto":  # an explicit device replaces the run's device map (--device-map auto)
        opts["device_map"] = None
    loaded = loading.load(model["source"], revision=model["revision"], device=target, dtype=model["dtype"], **opts)
    target = loaded.device  # with a device map: where its inputs go
    if loaded.weights_sha256 != model["weights_sha256"]:
        raise MlarchError(f"the weights at {model['source']} changed since the run (sha256 differs)")
    modules = scored_modules(loaded.model)
    method = (prov.get("method") or {}).get("name", methods.EXACT)
    ks = list(run["k_values"])
    if method == methods.BF16:  # the authors' bf16 scores and set sizes, as the run was scored
        from mlarch.ingest import mathneuro

        result = mathneuro.run_pass_bf16(loaded.model, loaded.tokenizer, modules, texts,
                                         batch_size=config["batch_size"], max_length=config["max_length"],
                                         device=target)

        def fresh_levels(m):
            return mathneuro.levels_bf16(result.scores[m.name], ks)
    elif method == methods.EXACT:
        result = run_pass(loaded.model, loaded.tokenizer, modules, texts, batch_size=config["batch_size"],
                          max_length=config["max_length"], device=target)

        def fresh_levels(m):
            return selection.level_codes(selection.scores(m.magnitudes(), result.norms[m.name]), ks)
    else:
        raise MlarchError(f"run {run_id} was scored with method {method!r}, which this mlarch cannot recompute: "
                          "recompute it with the mlarch version that made it")
    stored = archive.norms(run_id)
    worst = 0.0
    inter, union = np.zeros(len(ks)), np.zeros(len(ks))
    for m in modules:
        new, old = result.norms[m.name], stored[m.name]
        worst = max(worst, float(np.max(np.abs(new - old) / np.maximum(np.abs(old), 1e-12))))
        fresh = fresh_levels(m)
        kept = archive.levels(run_id, m.name)
        for j in range(len(ks)):
            a, b = selection.in_top(fresh, j), selection.in_top(kept, j)
            inter[j] += np.count_nonzero(a & b)
            union[j] += np.count_nonzero(a | b)
    rows = [{"metric": "device", "value": f"{target} (archived on {prov.get('device')})"},
            {"metric": "max relative norm difference", "value": f"{worst:.3g}"}]
    rows += [{"metric": f"Jaccard of top-{k} sets (math top-k, all modules)",
              "value": f"{inter[j] / union[j] if union[j] else 1.0:.6f}"} for j, k in enumerate(ks)]
    return rows
