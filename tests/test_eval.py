"""`mlarch eval` end to end on a tiny model: the archived NLL against an independent
reference (its own loading, forward and log-softmax; masks only through the public API),
reuse, bad input, crashes mid-grid, accuracy rows and --only-correct."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli

from fixtures import RecordingReporter

NAME = "tiny-llama"
K = 0.05


def _held_out_texts(archive, math_template: str, lang: str, seed: int = 1) -> tuple[list[int], list[str]]:
    """Items in file order minus those the math run in use drew: read independently."""
    path = Path(math_template.replace("{lang}", lang))
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    drawn = set(archive.sql(
        "SELECT s.item_index FROM run_samples s JOIN runs r USING (run_id) WHERE r.model = ? AND r.lang = ? "
        "AND r.role = 'math' AND r.seed = ? AND r.in_use AND r.status = 'FINISHED'", [NAME, lang, seed])["item_index"])
    kept = [i for i in range(len(records)) if i not in drawn]
    assert drawn and kept, "the fixture must both draw and hold out items"
    return kept, [f"Q: {records[i]['question'].strip()}\nA: {records[i]['answer'].strip()}" for i in kept]


def _reference_nll(model_path, texts, edit=None) -> float:
    """Per-text forward, log-softmax by hand, float64 sums; `edit(model)` changes weights first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if edit is not None:
        with torch.no_grad():
            edit(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logits = model(input_ids=ids).logits[0].double()
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            targets = ids[0, 1:]
            total += float(-logp[:-1].gather(1, targets[:, None]).sum())
            count += targets.numel()
    return total / count


def _masks(archive, lang: str, k: float) -> dict[str, torch.Tensor]:
    modules = archive.sql("SELECT module FROM modules WHERE model = ? ORDER BY position", [NAME])["module"]
    return {m: torch.from_numpy(archive.selection(NAME, lang, k, m, seed=1)) for m in modules}


def _row(archive, eval_id):
    return archive.sql("SELECT * FROM evaluations WHERE eval_id = ?", [eval_id]).row(0, named=True)


def test_nll_matches_an_independent_reference(archive_copy, model_dir, data):
    archive = mlarch.open(archive_copy)
    specs = [f"prune:de@{K}", f"scale:en@{K}:1.5", "prune:bn@0.03"]  # 0.03: re-thresholded, not archived
    result = archive.evaluate(str(model_dir["llama"]), ["en", "de"], "nll", data["math"], interventions=specs,
                              batch_size=3, device="cpu")
    assert len(result.written) == 2 * (1 + len(specs)) and not result.reused
    frame = archive.evaluations()
    assert set(frame["status"] if "status" in frame.columns else ["FINISHED"]) == {"FINISHED"}
    edits = {
        "none": (None, None),
        f"prune:de@{K}": (_masks(archive, "de", K), 0.0),
        f"scale:en@{K}:1.5": (_masks(archive, "en", K), 1.5),
        "prune:bn@0.03": (_masks(archive, "bn", 0.03), 0.0),
    }
    for lang in ("en", "de"):
        kept, texts = _held_out_texts(archive, data["math"], lang)
        for spec, (masks, factor) in edits.items():
            kind = spec.split(":")[0]
            rows = frame.filter((frame["lang"] == lang) & (frame["intervention"] == kind))
            if masks is not None:
                target, k = spec.split(":")[1].split("@")
                rows = rows.filter((rows["target_lang"] == target) & (rows["k"] == float(k.split(":")[0])))
            assert rows.height == 1, spec
            row = rows.row(0, named=True)

            def edit(model, masks=masks, factor=factor):
                for module, mask in masks.items():
                    weight = model.get_submodule(module).weight
                    weight[mask] = weight[mask] * factor

            expected = _reference_nll(model_dir["llama"], texts, None if masks is None else edit)
            assert math.isclose(row["value"], expected, rel_tol=1e-4), (spec, lang, row["value"], expected)
            assert row["n_items"] == len(kept)
            items = archive.evaluation_items(row["eval_id"])
            assert items["item_index"].to_list() == kept
            if masks is None:
                assert row["n_params_changed"] == 0
            else:
                size = sum(int(m.sum()) for m in masks.values())
                assert size > 0 and row["n_params_changed"] == size == row["n_set"]
    # the interventions changed something, and differently
    values = {r["intervention"] + str(r["target_lang"]): r["value"] for r in frame.filter(frame["lang"] == "de").iter_rows(named=True)}
    assert len(set(values.values())) == len(values)


def test_effects_view_reuse_and_weights_restored(archive_copy, model_dir, data):
    archive = mlarch.open(archive_copy)
    args = (str(model_dir["llama"]), ["en", "de", "bn"], "nll", data["math"])
    grid = [f"prune:{lang}@{K}" for lang in ("en", "de", "bn")] + [f"random:en@{K}", f"fraction:en@{K}:0.5"]
    first = archive.evaluate(*args, interventions=grid, device="cpu")
    heard = RecordingReporter()
    again = archive.evaluate(*args, interventions=grid, device="cpu", reporter=heard)
    assert not again.written and sorted(again.reused) == sorted(first.written)
    assert any("reusing them (force=True reruns)" in line for line in heard.lines), heard.lines
    matrix = archive.sql("SELECT target_lang, lang, baseline, value, delta, relative_change, n_params_changed "
                         "FROM intervention_effects WHERE intervention = 'prune' AND k = ?", [K])
    assert matrix.height == 9 and matrix["relative_change"].null_count() == 0
    for r in matrix.iter_rows(named=True):
        assert math.isclose(r["delta"], r["value"] - r["baseline"], rel_tol=1e-12, abs_tol=1e-15)
    null = archive.sql("SELECT n_set, n_params_changed FROM intervention_effects WHERE intervention = 'random'")
    assert null.height == 3 and (null["n_set"] == null["n_params_changed"]).all()
    half = archive.sql("SELECT n_set, n_params_changed FROM intervention_effects WHERE intervention = 'fraction'")
    per_module = sum(int(m.sum()) // 2 for m in _masks(archive, "en", K).values())  # floor(0.5 n) per matrix
    assert (half["n_params_changed"] == per_module).all() and per_module < half["n_set"][0] / 2
    # a baseline evaluated after the grid equals the first: every undo was exact
    rerun = archive.evaluate(*args, force=True, device="cpu")
    base = archive.sql("SELECT lang, value FROM evaluations WHERE intervention = 'none' AND status = 'FINISHED' "
                       "ORDER BY lang, created_at")
    for lang in ("en", "de", "bn"):
        values = base.filter(base["lang"] == lang)["value"].to_list()
        assert len(values) == 2 and values[0] == values[1]
    assert len(rerun.written) == 3


def _run(root, *args):
    result = CliRunner().invoke(cli, ["--archive", str(root), *args])
    return result.exit_code, result.output


def _eval_rows(root) -> int:
    return mlarch.open(root).sql("SELECT count(*) AS n FROM evaluations")["n"][0]


@pytest.mark.parametrize("extra, words", [
    (["--intervene", "cut:en@0.01"], "unknown intervention kind"),
    (["--intervene", "prune:en@1.5"], "(0, 1)"),
    (["--intervene", "prune:en@0"], "(0, 1)"),
    (["--intervene", "scale:en@0.01:nan"], "finite"),
    (["--intervene", "scale:en@0.01:inf"], "finite"),
    (["--intervene", "prune:fr@0.01"], "no archived math and control runs for 'fr'"),
    (["--intervene", "prune:en@0.01", "--name", "no-such-model"], "no model 'no-such-model'"),
    (["--intervene", "prune:en@0.0000001"], "selects no parameter"),
    (["--limit", "0"], "--limit"),
    (["--limit", "3", "--all-items"], "exclude each other"),
])
def test_bad_input_is_one_line_and_writes_nothing(archive_copy, model_dir, data, extra, words):
    before = _eval_rows(archive_copy)
    code, output = _run(archive_copy, "eval", "--model", str(model_dir["llama"]), "--langs", "en", "--task", "nll",
                        "--data", data["math"], "-q", *extra)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], output
    assert "Traceback" not in output
    assert _eval_rows(archive_copy) == before


def test_other_weights_are_refused_before_any_row(archive_copy, model_dir, data):
    code, output = _run(archive_copy, "eval", "--model", str(model_dir["qwen2"]), "--name", NAME, "--langs", "en",
                        "--task", "nll", "--data", data["math"], "--intervene", f"prune:en@{K}", "-q")
    assert code == 2 and "other weights" in output and len(output.strip().splitlines()) == 1, output
    assert _eval_rows(archive_copy) == 0


def test_no_item_left_is_refused(archive_copy, model_dir, data, tmp_path):
    one = tmp_path / "one" / "{lang}.jsonl"
    Path(str(one).replace("{lang}", "en")).parent.mkdir(parents=True)
    Path(str(one).replace("{lang}", "en")).write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    code, output = _run(archive_copy, "eval", "--model", str(model_dir["llama"]), "--langs", "en", "--task",
                        "accuracy", "--data", str(one), "--shots", "1", "-q")
    assert code == 2 and "Error: " in output, output
    assert _eval_rows(archive_copy) == 0


def test_a_crash_mid_grid_keeps_finished_evaluations(archive_copy, model_dir, data, monkeypatch):
    from mlarch.evaluation import tasks

    archive = mlarch.open(archive_copy)
    real, calls = tasks.nll_pass, []

    def failing(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # inside the second intervention, weights changed
            raise RuntimeError("planted crash")
        return real(model, *args, **kwargs)

    from mlarch.ingest import loading

    monkeypatch.setattr(tasks, "nll_pass", failing)
    with pytest.raises(RuntimeError, match="planted crash"):
        archive.evaluate(str(model_dir["llama"]), ["en", "de"], "nll", data["math"],
                         interventions=[f"prune:en@{K}", f"prune:de@{K}"], device="cpu")
    rows = archive.sql("SELECT eval_id, status, n_items FROM evaluations ORDER BY created_at")
    assert rows["status"].to_list() == ["FINISHED"] * 3 + ["FAILED"]
    failed = rows["eval_id"][3]
    assert archive.sql("SELECT count(*) AS n FROM evaluation_items WHERE eval_id = ?", [failed])["n"][0] == 0
    assert archive.evaluations().height == 3
    from mlarch.store import maintenance

    assert any("evaluation" in c.object and not c.ok for c in maintenance.verify(archive.root))
    removed = maintenance.gc(archive.root)
    assert any(failed in r for r in removed)
    checks = maintenance.verify(archive.root)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    # the rerun reuses the three finished evaluations and runs the rest
    monkeypatch.setattr(tasks, "nll_pass", real)
    again = archive.evaluate(str(model_dir["llama"]), ["en", "de"], "nll", data["math"],
                             interventions=[f"prune:en@{K}", f"prune:de@{K}"], device="cpu")
    assert len(again.reused) == 3 and len(again.written) == 3
    del loading


def test_verify_catches_an_edited_evaluation(archive_copy, model_dir, data):
    from mlarch.store import maintenance

    archive = mlarch.open(archive_copy)
    archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], device="cpu")
    assert all(c.ok for c in maintenance.verify(archive.root))
    archive.sql("UPDATE evaluation_items SET nll = nll * 0.5 WHERE position = 0", write=True)
    bad = [c for c in maintenance.verify(archive.root) if not c.ok]
    assert bad and bad[0].check == "record digest" and bad[0].object.startswith("evaluation ")


def test_accuracy_rows_and_only_correct(archive_copy, model_dir, data, monkeypatch):
    from mlarch.evaluation import answers

    archive = mlarch.open(archive_copy)
    # the tiny model answers nothing right: mark even items correct to exercise the pool
    real = answers.correct
    monkeypatch.setattr(answers, "correct", lambda extracted, reference: int(reference) % 2 == 1)
    result = archive.evaluate(str(model_dir["llama"]), ["en", "de"], "accuracy", data["math"], all_items=True,
                              shots=1, max_new_tokens=8, device="cpu")
    monkeypatch.setattr(answers, "correct", real)
    assert len(result.written) == 2
    items = archive.evaluation_items(result.written[0])
    assert items.height == 9  # 10 items minus the one exemplar
    assert items["reference"].null_count() == 0 and items["completion"].null_count() == 0
    assert items["prompt_sha256"].str.len_chars().to_list() == [64] * 9
    row = _row(archive, result.written[0])
    assert row["value"] == items["correct"].mean()
    correct = {r["lang"]: set(archive.evaluation_items(r["eval_id"]).filter(pl_col("correct"))["item_index"])
               for r in archive.evaluations().iter_rows(named=True)}
    assert all(correct.values())
    ids = ",".join(result.written)
    code, output = _run(archive_copy, "ingest", "--model", str(model_dir["llama"]), "--langs", "en,de", "--math",
                        data["math"], "--control", data["control"], "--samples", "12", "--top-k", "0.01,0.05,0.25",
                        "--only-correct", ids, "--device", "cpu", "-q")
    assert code == 0, output
    drawn = archive.sql("SELECT r.lang, s.item_index FROM run_samples s JOIN runs r USING (run_id) "
                        "WHERE r.role = 'math' AND r.in_use AND r.analysis = 'math-correct-vs-control'")
    for lang in ("en", "de"):
        got = set(drawn.filter(drawn["lang"] == lang)["item_index"])
        assert got and got <= correct[lang], (lang, got, correct[lang])
    # one language without an evaluation: refused before any work
    code, output = _run(archive_copy, "ingest", "--model", str(model_dir["llama"]), "--langs", "en,bn", "--math",
                        data["math"], "--control", data["control"], "--only-correct", result.written[0], "-q")
    assert code == 2 and "names no evaluation for bn" in output, output


def pl_col(name):
    import polars as pl

    return pl.col(name)
