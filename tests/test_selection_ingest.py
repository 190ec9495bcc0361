"""Ingest with selection on the scoring device (the torch path, forced on the CPU with
MLARCH_SELECTION=torch) archives exactly what the numpy path archives: every run's level
codes (their sha256), norms, config digests, the derived set sizes and patterns.

The models are the tiny fixtures with ties planted where cuts fall (rows made equal, inputs
zeroed so whole columns score 0, weights quantised to a few values), and wide enough that
some modules take the sampled-bound route (>= 4 * 2**14 entries); the test checks that the
tie rule really decides some cut in the archived runs, and that every stored code is what an
independent stable argsort of the stored |W| x norms gives. The torch-path ingest also runs
with the background thread on (pipeline.overlaps, as on an accelerator)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("duckdb")  # the device machine's image has torch but no duckdb or zarr
pytest.importorskip("zarr")

import mlarch  # noqa: E402
from fixtures import one_error  # noqa: E402
from mlarch import selection_device  # noqa: E402
from mlarch.ingest import context, pipeline  # noqa: E402
from mlarch.selection import level_codes, scores, top_count  # noqa: E402
from mlarch.selection_device import weights_levels  # noqa: E402
from mlarch.store import arrays, catalog  # noqa: E402
from mlarch.store.rows import dicts  # noqa: E402
from mlarch.store.spans import read_spans  # noqa: E402
from tied_models import KS, SAMPLED, build_tied, crowded_cuts  # noqa: E402


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory):
    return build_tied(tmp_path_factory.mktemp("tied"))


def ingest(root, model_path, data, path: str, monkeypatch, overlap: bool = False):
    calls = []  # runs whose codes the torch path computed (the provenance could claim it wrongly)

    def counted(*args, **kwargs):
        calls.append(threading.current_thread() is not threading.main_thread())
        return weights_levels(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setenv(context.SELECTION_ENV, path)
        patch.setattr(selection_device, "weights_levels", counted)
        if overlap:  # selection in the background thread beside the next pass, as on CUDA
            patch.setattr(pipeline, "overlaps", lambda device: True)
        mlarch.open(root).ingest(str(model_path), ["en", "de"], data["math"], data["control"], samples=4,
                                 top_k=KS, device="cpu")
    assert calls == ([overlap] * 4 if path == "torch" else []), calls
    return root


@pytest.fixture(scope="module")
def archives(tmp_path_factory, tied_models, data):
    """{kind: (numpy-path archive, torch-path archive)}, both of the same tied models."""
    monkeypatch = pytest.MonkeyPatch()
    out = {}
    try:
        for kind, path in tied_models.items():
            base = tmp_path_factory.mktemp(f"sel-{kind}")
            out[kind] = (ingest(base / "numpy", path, data, "numpy", monkeypatch),
                         ingest(base / "torch", path, data, "torch", monkeypatch, overlap=True))
    finally:
        monkeypatch.undo()
    return out


def summary(root) -> dict:
    """What must not depend on the selection path: per (lang, role, seed) the config digest
    and the sha256 of its norms and level codes; |W|; set sizes and patterns (no run ids)."""
    with catalog.reading(root / "catalog.duckdb") as con:
        runs = dicts(con, "SELECT run_id, lang, role, seed, config_digest, k_values FROM runs "
                          "WHERE status = 'FINISHED'")
        by_id = {r["run_id"]: (r["lang"], r["role"], r["seed"]) for r in runs}
        digests = {(by_id[a["owner"]], a["kind"]) if a["owner"] in by_id else (a["owner"], a["kind"]): a["sha256"]
                   for a in dicts(con, "SELECT owner, kind, sha256 FROM arrays")}
        selections = sorted(con.execute(
            "SELECT model, k, seed, lang, module, n_math_top, n_control_top, n_selected FROM selections").fetchall())
        patterns = sorted(con.execute("SELECT model, k, seed, module, langs, n_params FROM patterns").fetchall())
        paths = {r["selection"] for r in dicts(
            con, "SELECT json_extract_string(provenance, '$.selection') AS selection FROM runs")}
    configs = {by_id[r["run_id"]]: (r["config_digest"], tuple(r["k_values"])) for r in runs}
    return {"configs": configs, "arrays": digests, "selections": selections, "patterns": patterns, "paths": paths}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_torch_path_archives_the_same_bytes(archives, kind):
    numpy_root, torch_root = archives[kind]
    numpy_side, torch_side = summary(numpy_root), summary(torch_root)
    assert numpy_side.pop("paths") == {"numpy"} and torch_side.pop("paths") == {"torch"}  # provenance says which
    assert len(numpy_side["configs"]) == 4 and sum(kind == "levels" for _, kind in numpy_side["arrays"]) == 4
    assert numpy_side["selections"] and numpy_side["patterns"]
    for key in numpy_side:
        assert torch_side[key] == numpy_side[key], key


def test_provenance_records_the_path_in_the_shipped_schema(archives):
    import json
    from importlib import resources

    import jsonschema

    schema = json.loads((resources.files("mlarch.schemas") / "run_provenance.schema.json").read_text())
    for root in archives["llama"]:
        archive = mlarch.open(root)
        for run_id in archive.sql("SELECT run_id FROM runs")["run_id"]:
            provenance = archive.run(run_id)["provenance"]
            jsonschema.validate(provenance, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**provenance, "selection": "gpu"}, schema)


def stored(root) -> tuple[list, np.ndarray, dict]:
    """(spans, |W|, {run_id: (norms, levels)}) as archived, each array's bytes checked
    against the content digest the catalog recorded."""
    with catalog.reading(root / "catalog.duckdb") as con:
        model = con.execute("SELECT model FROM models").fetchone()[0]
        spans = read_spans(con, model)
        rows = dicts(con, f"SELECT owner, kind, {arrays.RECORD_COLUMNS} FROM arrays")
    read = {}
    for row in rows:
        data = arrays.read(root / "arrays.zarr", arrays.ArrayRecord.from_row(row))
        assert arrays.content_digest(data) == row["sha256"]  # what the catalog vouches for is what was read
        read[(row["owner"], row["kind"])] = data
    magnitudes = read.pop((model, "magnitudes"))
    runs = {owner: (read[(owner, "norms")], read[(owner, "levels")]) for owner, kind in read if kind == "levels"}
    return spans, magnitudes, runs


def by_argsort(module_scores: np.ndarray, counts: list[int]) -> np.ndarray:
    """The rule itself: stable argsort of -score, the first counts[j] entries at level j + 1."""
    order = np.argsort(-module_scores.reshape(-1), kind="stable")
    levels = np.zeros(module_scores.size, np.uint8)
    for j in reversed(range(len(counts))):
        levels[order[:counts[j]]] = j + 1
    return levels


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_torch_path_codes_follow_the_tie_rule(archives, kind):
    """Every stored code of the torch-path archive is the rule's, recomputed from the stored
    |W| and norms; and ties really decide cuts: in a sampled-size module, and at zero."""
    spans, magnitudes, runs = stored(archives[kind][1])
    crowded, crowded_sampled, crowded_zero = 0, 0, 0
    for norms, levels in runs.values():
        for span in spans:
            module_scores = scores(magnitudes[span.params].reshape(span.n_rows, span.n_cols), norms[span.norms])
            counts = [top_count(span.n_params, k) for k in KS]
            np.testing.assert_array_equal(levels[span.params], by_argsort(module_scores, counts), err_msg=span.module)
            for _, at in crowded_cuts(module_scores, counts):
                crowded += 1
                crowded_sampled += span.n_params >= SAMPLED
                crowded_zero += at == 0
    assert crowded >= 10 and crowded_sampled >= 2, (crowded, crowded_sampled)
    if kind == "llama":
        assert crowded_zero >= 1  # the dead inputs' zero scores


def test_bad_selection_setting_is_refused_before_loading(model_dir, data, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlarch.cli import cli

    monkeypatch.setenv(context.SELECTION_ENV, "gpu")
    root = tmp_path / "arch"
    result = CliRunner().invoke(cli, ["--archive", str(root), "ingest", "--model", str(model_dir["llama"]),
                                      "--langs", "en", "--math", data["math"], "--control", data["control"], "--samples", "2"])
    line = one_error(result, 2)
    assert "MLARCH_SELECTION='gpu'" in line and "auto, numpy or torch" in line
    assert not (root / "catalog.duckdb").exists()


def test_selection_path_choice(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv(context.SELECTION_ENV, raising=False)
    assert context.selection_path(cuda, "mathneuro") == "torch"
    assert context.selection_path(cpu, "mathneuro") == "numpy"
    assert context.selection_path(cuda, "mathneuro-bf16") == "numpy"  # its own selection, on the host
    monkeypatch.setenv(context.SELECTION_ENV, "Torch")
    assert context.selection_path(cpu, "mathneuro") == "torch"
    monkeypatch.setenv(context.SELECTION_ENV, "numpy")
    assert context.selection_path(cuda, "mathneuro") == "numpy"
    monkeypatch.setenv(context.SELECTION_ENV, "auto")
    assert context.selection_path(cuda, "mathneuro") == "torch"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_ingest_selects_on_the_device(tied_models, data, tmp_path, monkeypatch, dtype):
    """On CUDA ingest chooses the torch path by itself (background thread on), and its codes
    are the numpy path's over the archived |W| and norms."""
    monkeypatch.delenv(context.SELECTION_ENV, raising=False)
    root = tmp_path / "arch"
    mlarch.open(root).ingest(str(tied_models["llama"]), ["en", "de"], data["math"], data["control"], samples=4,
                             top_k=KS, device="cuda", dtype=dtype)
    assert summary(root)["paths"] == {"torch"}
    spans, magnitudes, runs = stored(root)
    for norms, levels in runs.values():
        for span in spans:
            module_scores = scores(magnitudes[span.params].reshape(span.n_rows, span.n_cols), norms[span.norms])
            np.testing.assert_array_equal(levels[span.params], level_codes(module_scores, KS).reshape(-1))
