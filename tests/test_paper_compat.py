"""Issue 15 wired into ingest: `--paper-compat` (mathneuro-bf16, the pandas draw, the authors'
texts, no truncation) lands in its own analysis beside the exact one; its sets are those of the
building blocks run directly; the comparison between the two; no re-thresholding of a bf16 run;
bad combinations refused up front; exact runs unchanged (same digests, reused)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import mlarch
from mlarch import methods
from mlarch.cli import cli
from mlarch.errors import UsageError
from mlarch.ingest import mathneuro, paper_sampling, scoring, sources
from mlarch.store import maintenance

from fixtures import math_items

KS = [0.05, 0.25]
LANGS = ["en", "de"]
SAMPLES = 5
SEED = 2


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory, data):
    """math/{lang}.jsonl with the authors' columns (question, solution) and ours (answer)."""
    folder = tmp_path_factory.mktemp("paper-data")
    (folder / "gsm").mkdir()
    for lang in LANGS:
        with open(folder / "gsm" / f"{lang}.jsonl", "w", encoding="utf-8") as handle:
            for i, item in enumerate(math_items(lang, n=9)):
                solution = f"x = {i + 2}\ny = {3 * i + 1}\nprint(x + y)"
                handle.write(json.dumps({**item, "solution": solution}, ensure_ascii=False) + "\n")
    return {"math": str(folder / "gsm" / "{lang}.jsonl"), "control": data["control"]}


def _common(model_dir, paper_data):
    return [str(model_dir["llama"]), LANGS, paper_data["math"], paper_data["control"]]


@pytest.fixture(scope="module")
def both(tmp_path_factory, model_dir, paper_data):
    """One archive: an exact analysis and a --paper-compat analysis of tiny Llama on the same data."""
    root = tmp_path_factory.mktemp("compat") / "arch"
    archive = mlarch.open(root)
    options = dict(samples=SAMPLES, seeds=[SEED], top_k=KS, device="cpu")
    exact = archive.ingest(*_common(model_dir, paper_data), dtype="bfloat16", **options)
    paper = archive.ingest(*_common(model_dir, paper_data), paper_compat=True, **options)
    return {"root": root, "exact": exact, "paper": paper}


def _runs(archive, analysis):
    return archive.sql("SELECT run_id, lang, role, config_digest, provenance FROM runs WHERE analysis = ? "
                       "AND status = 'FINISHED' ORDER BY lang, role", [analysis]).to_dicts()


def test_exact_and_paper_compat_land_in_two_analyses(both):
    assert both["exact"].analysis == "gsm-vs-control"
    assert both["paper"].analysis == "gsm-vs-control-paper"
    assert len(both["exact"].written) == len(both["paper"].written) == 4
    archive = mlarch.open(both["root"])
    configs = {r["analysis"]: json.loads(r["config"]) for r in
               archive.sql("SELECT analysis, config FROM analyses").to_dicts()}
    assert configs["gsm-vs-control-paper"]["method"] == methods.BF16
    assert configs["gsm-vs-control-paper"]["sampling"] == "pandas"
    assert configs["gsm-vs-control-paper"]["shuffle_seed"] == 1
    assert configs["gsm-vs-control-paper"]["template"] == "paper"
    assert configs["gsm-vs-control-paper"]["max_length"] is None
    assert not {"method", "sampling", "shuffle_seed", "template"} & set(configs["gsm-vs-control"])
    shown = dict(archive.analyses().select("analysis", "method").rows())
    assert shown == {"gsm-vs-control": "mathneuro",
                     "gsm-vs-control-paper": "mathneuro-bf16 (sampling=pandas, shuffle_seed=1, template=paper)"}


def test_compat_runs_equal_the_building_blocks_run_directly(both, model_dir, paper_data):
    """Level codes = mathneuro.levels_bf16 of run_pass_bf16 on the pandas-drawn Instruct texts,
    computed here without the pipeline; run_samples = pandas_draw; provenance says so."""
    archive = mlarch.open(both["root"])
    path = model_dir["llama"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    modules = scoring.scored_modules(model)
    for r in _runs(archive, "gsm-vs-control-paper"):
        prov = json.loads(r["provenance"])
        assert prov["method"]["name"] == methods.BF16 and prov["method"]["rethresholdable"] is False
        assert prov["sampling"] == {"sampling": "pandas", "rule": paper_sampling.DESCRIPTIONS["pandas"], "shuffle_seed": 1}
        assert prov["template"] == "paper"
        assert prov["config"]["max_length"] is None and prov["config"]["batch_size"] == 1
        assert prov["model"]["dtype"] == "bfloat16"
        if r["role"] == "math":
            items = [json.loads(line) for line in Path(paper_data["math"].format(lang=r["lang"])).read_text().splitlines()]
            all_texts = [sources.instruct_text(i["question"], i["solution"]) for i in items]
        else:
            all_texts = [t for t in Path(paper_data["control"].format(lang=r["lang"])).read_text().splitlines() if t.strip()]
        drawn = paper_sampling.pandas_draw(len(all_texts), SAMPLES, SEED, 1)
        stored = archive.sql("SELECT item_index FROM run_samples WHERE run_id = ? ORDER BY position",
                             [r["run_id"]])["item_index"].to_list()
        assert stored == drawn.tolist() == prov["sample_indices"]
        assert stored != np.random.default_rng(SEED).integers(0, len(all_texts), size=SAMPLES).tolist()
        direct = mathneuro.run_pass_bf16(model, tokenizer, modules, [all_texts[i] for i in drawn], batch_size=1,
                                         max_length=None, device=torch.device("cpu"))
        for m in modules:
            expected = mathneuro.levels_bf16(direct.scores[m.name], KS).reshape(m.n_rows, m.n_cols)
            np.testing.assert_array_equal(archive.levels(r["run_id"], m.name), expected, err_msg=m.name)
    # and the exact analysis's runs are the exact method's, numpy draw, default texts
    for r in _runs(archive, "gsm-vs-control"):
        prov = json.loads(r["provenance"])
        assert prov["method"]["name"] == methods.EXACT and "sampling" not in prov and "template" not in prov


def test_verify_is_clean_with_the_authors_set_sizes(both):
    checks = maintenance.verify(both["root"])
    assert [c for c in checks if not c.ok] == []
    sizes = [c for c in checks if c.check == "top-k sizes"]
    assert len(sizes) == 2  # one per analysis (seed SEED)


def test_verify_recompute_rescores_each_run_by_its_own_method_and_texts(both):
    """A --paper-compat run is recomputed with the authors' bf16 arithmetic and set sizes on the
    authors' texts (template paper): the same codes, the same norms. Recomputed with the exact
    method it read Jaccard ~0.985 (a false failure); with the default texts it failed to parse."""
    archive = mlarch.open(both["root"])
    for analysis in ("gsm-vs-control-paper", "gsm-vs-control"):
        for r in _runs(archive, analysis)[:2]:  # en control, en math
            result = run(both["root"], "verify", "--recompute", r["run_id"], "--format", "json")
            assert result.exit_code == 0, (analysis, result.output)
            rows = {row["metric"]: row["value"] for row in json.loads(result.stdout)}
            assert rows["max relative norm difference"] == "0", (analysis, rows)
            assert [v for m, v in rows.items() if m.startswith("Jaccard")] == ["1.000000"] * len(KS), (analysis, rows)


def test_compare_analyses_reports_jaccard_per_layer_and_k(both):
    for k in KS:
        result = run(both["root"], "compare", "--model", "tiny-llama", "--langs", "en", "--analyses",
                     "gsm-vs-control,gsm-vs-control-paper", "--k", str(k), "--format", "json")
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        assert {r["layer"] for r in rows} >= {0, 1} and all(r["k"] == k for r in rows)
        for r in rows:
            assert r["n_union"] >= max(r["n_a"], r["n_b"]) and r["n_intersection"] <= min(r["n_a"], r["n_b"])
            assert r["jaccard"] is None or 0 <= r["jaccard"] <= 1
    # the numbers are the masks' own
    archive = mlarch.open(both["root"])
    frame = archive.analysis_overlap("tiny-llama", "en", ["gsm-vs-control", "gsm-vs-control-paper"], k=KS[1],
                                     by="global")
    a = b = inter = 0
    for module in archive._spans("tiny-llama"):
        x = archive.selection("tiny-llama", "en", KS[1], module, analysis="gsm-vs-control")
        y = archive.selection("tiny-llama", "en", KS[1], module, analysis="gsm-vs-control-paper")
        a, b, inter = a + int(x.sum()), b + int(y.sum()), inter + int((x & y).sum())
    row = frame.row(0, named=True)
    assert (row["n_a"], row["n_b"], row["n_intersection"]) == (a, b, inter)
    assert 0 < row["jaccard"] < 1  # bf16 sets differ from exact ones, but overlap


def test_bf16_analysis_cannot_be_rethresholded(both):
    archive = mlarch.open(both["root"])
    module = next(iter(archive._spans("tiny-llama")))
    with pytest.raises(UsageError) as caught:
        archive.selection("tiny-llama", "en", 0.1, module, analysis="gsm-vs-control-paper")
    message = str(caught.value)
    assert "\n" not in message and "0.05, 0.25" in message and "not at 0.1" in message
    pair = {r["role"]: r["run_id"] for r in _runs(archive, "gsm-vs-control-paper") if r["lang"] == "en"}
    assert message.startswith(f"run {pair['math']} used method='mathneuro-bf16'")  # the math run is read first
    run_id = pair["control"]
    with pytest.raises(UsageError):
        archive.top_k(run_id, module, 0.1)
    with pytest.raises(UsageError, match="not archived"):  # no |W| x norms scores to show either
        archive.scores(run_id, module)
    # at an archived k: the archived sets (math top-k and not control top-k, from the level codes)
    got = archive.selection("tiny-llama", "en", 0.25, module, analysis="gsm-vs-control-paper")
    math_in = (archive.levels(pair["math"], module) >= 1) & (archive.levels(pair["math"], module) <= 2)
    control_in = (archive.levels(pair["control"], module) >= 1) & (archive.levels(pair["control"], module) <= 2)
    np.testing.assert_array_equal(got, math_in & ~control_in)
    # the exact analysis still re-thresholds
    assert archive.selection("tiny-llama", "en", 0.1, module, analysis="gsm-vs-control").any()
    # the CLI too: one line, exit 2
    result = run(both["root"], "compare", "--model", "tiny-llama", "--langs", "en", "--analyses",
                 "gsm-vs-control,gsm-vs-control-paper", "--k", "0.1")
    assert result.exit_code == 2 and "Error: run " in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("extra, needle", [
    (["--method", "mathneuro-bf16", "--dtype", "float32"], "bfloat16"),
    (["--paper-compat", "--dtype", "float32"], "bfloat16"),
    (["--sampling", "pandas"], "--shuffle-seed"),
    (["--shuffle-seed", "1"], "--sampling pandas"),
    (["--template", "paper", "--math", "starter"], "named source"),
    (["--method", "exact"], "mathneuro"),
    (["--max-length", "many"], "none"),
])
def test_bad_combinations_are_refused_before_any_work(tmp_path, model_dir, paper_data, extra, needle):
    root = tmp_path / "arch"
    args = ["ingest", "--model", str(model_dir["llama"]), "--langs", "en", "--math", paper_data["math"],
            "--control", paper_data["control"], "--samples", "2", "--top-k", "0.25", "--device", "cpu"]
    if "--math" in extra:  # replace the data
        args[args.index("--math") + 1] = extra[extra.index("--math") + 1]
        extra = [e for i, e in enumerate(extra) if e != "--math" and (i == 0 or extra[i - 1] != "--math")]
    result = run(root, *args, *extra)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not root.exists()  # nothing written


def test_paper_compat_with_another_k_list_is_refused(both, model_dir, paper_data):
    archive = mlarch.open(both["root"])
    before = archive.sql("SELECT count(*) AS n FROM runs")["n"][0]
    with pytest.raises(UsageError, match="top_k"):
        archive.ingest(*_common(model_dir, paper_data), paper_compat=True, samples=SAMPLES, seeds=[SEED],
                       top_k=[0.1], device="cpu")
    assert archive.sql("SELECT count(*) AS n FROM runs")["n"][0] == before


def test_exact_runs_are_unchanged_and_reused(both, model_dir, paper_data):
    """The exact analysis's digests carry no paper-compat key; a rerun with the new code reuses them."""
    archive = mlarch.open(both["root"])
    exact = _runs(archive, "gsm-vs-control")
    for r in exact:
        config = json.loads(r["provenance"])["config"]
        assert (config["method"], config["sampling"], config["template"]) == ("mathneuro", "numpy", "default")
    analysis = archive.sql("SELECT config_digest, config FROM analyses WHERE analysis = 'gsm-vs-control'").row(0)
    import hashlib

    fields = ("math", "control", "samples", "max_length", "top_k", "only_correct")  # the digest before issue 15
    text = json.dumps({f: json.loads(analysis[1]).get(f) for f in fields}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    assert analysis[0] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    again = archive.ingest(*_common(model_dir, paper_data), samples=SAMPLES, seeds=[SEED], top_k=KS, device="cpu",
                           dtype="bfloat16")
    assert again.written == [] and sorted(again.skipped) == sorted(r["run_id"] for r in exact)
    paper_again = archive.ingest(*_common(model_dir, paper_data), paper_compat=True, samples=SAMPLES, seeds=[SEED],
                                 top_k=KS, device="cpu")
    assert paper_again.written == [] and len(paper_again.skipped) == 4
    digests = {r["config_digest"] for r in exact} | {r["config_digest"] for r in _runs(archive, "gsm-vs-control-paper")}
    assert len(digests) == 8


def test_authors_set_sizes_are_archived_and_verified(tmp_path, paper_data):
    """A model whose matrices make int(numel * k) differ from top_count (400 * 0.29 = 115.99...):
    the derived sizes are the authors', and verify's recount accepts them (and only them)."""
    from fixtures import build_model
    from mlarch.selection import top_count

    path = build_model("llama", tmp_path, hidden_size=20, intermediate_size=30, num_attention_heads=2,
                       num_key_value_heads=1)
    root = tmp_path / "arch"
    archive = mlarch.open(root)
    archive.ingest(str(path), ["en"], paper_data["math"], paper_data["control"], paper_compat=True, samples=3,
                   top_k=[0.29], device="cpu")
    sizes = archive.sql("SELECT s.n_math_top, s.n_control_top, m.n_params FROM selections s JOIN modules m "
                        "USING (model, module) WHERE m.n_params = 400").rows()
    assert sizes and all(a == c == methods.authors_count(400, 0.29) == top_count(400, 0.29) - 1 for a, c, _ in sizes)
    failed = [c for c in maintenance.verify(root) if not c.ok]
    assert failed == []

    # Re-derived elsewhere (rm of another language's runs, a bundle import): still the authors' sizes.
    archive.ingest(str(path), ["de"], paper_data["math"], paper_data["control"], paper_compat=True, samples=3,
                   top_k=[0.29], device="cpu")
    de_runs = archive.sql("SELECT run_id FROM runs WHERE lang = 'de'")["run_id"].to_list()
    bundle = tmp_path / "en.tar"
    en_runs = archive.sql("SELECT run_id FROM runs WHERE lang = 'en'")["run_id"].to_list()
    from mlarch.store import bundle as bundles

    bundles.export_bundle(root, bundle, run_ids=en_runs)
    archive.rm(de_runs)  # derive runs again for en alone
    assert [c for c in maintenance.verify(root) if not c.ok] == []
    other = tmp_path / "other"
    bundles.import_bundle(other, bundle)
    assert [c for c in maintenance.verify(other) if not c.ok] == []
    imported = mlarch.open(other).sql("SELECT s.n_math_top FROM selections s JOIN modules m USING (model, module) "
                                      "WHERE m.n_params = 400")["n_math_top"].to_list()
    assert imported and set(imported) == {methods.authors_count(400, 0.29)}


def test_method_alone_is_part_of_the_identity(both, model_dir, paper_data):
    """--method mathneuro-bf16 with everything else exact: refused under the exact analysis's
    name, and its runs' config digests differ from the exact runs' (nothing reused)."""
    archive = mlarch.open(both["root"])
    with pytest.raises(UsageError, match="method"):
        archive.ingest(str(model_dir["llama"]), ["en"], paper_data["math"], paper_data["control"], samples=SAMPLES,
                       seeds=[SEED], top_k=KS, device="cpu", method=methods.BF16, analysis="gsm-vs-control")
    result = archive.ingest(str(model_dir["llama"]), ["en"], paper_data["math"], paper_data["control"],
                            samples=SAMPLES, seeds=[SEED], top_k=KS, device="cpu", method=methods.BF16,
                            dtype="bfloat16", analysis="bf16-only")
    assert len(result.written) == 2 and not result.skipped
    exact = {r["config_digest"] for r in _runs(archive, "gsm-vs-control")}
    assert not exact & {r["config_digest"] for r in _runs(archive, "bf16-only")}


def test_exact_config_digest_is_the_one_before_issue_15(both):
    """An exact run's config digest is computed from exactly the keys it had before the
    paper-compat options existed (so runs archived then are reused by a rerun now)."""
    from mlarch.ingest import pipeline, provenance

    archive = mlarch.open(both["root"])
    for r in _runs(archive, "gsm-vs-control"):
        prov = json.loads(r["provenance"])
        config = prov["config"]
        assert prov["method"] == pipeline.METHOD
        identity = {  # the identity of mlarch before issue 15 (a local model: no loading options)
            "method": pipeline.METHOD, "model": config["name"], "source": config["model"], "revision": None,
            "dtype": config["dtype"], "lang": r["lang"], "role": r["role"], "dataset": prov["data"]["dataset"],
            "data_files": prov["data"]["files"], "seed": prov["seed"], "samples": config["samples"],
            "max_length": config["max_length"], "top_k": config["top_k"],
        }
        assert r["config_digest"] == provenance.digest_json(identity)
