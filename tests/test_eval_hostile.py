"""`mlarch eval` against changed weights, edited catalogs and awkward data (found by review)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _run(root, *args):
    result = CliRunner().invoke(cli, ["--archive", str(root), *args])
    return result.exit_code, result.output


def _perturbed_copy(model_path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_path, target)
    model = AutoModelForCausalLM.from_pretrained(str(target))
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    model.save_pretrained(target)
    return target


def test_changed_weights_are_never_reused(tmp_path, model_dir, data):
    model = tmp_path / "m"
    shutil.copytree(model_dir["llama"], model)
    archive = mlarch.open(tmp_path / "a")
    first = archive.evaluate(str(model), ["en"], "nll", data["math"], name="m", all_items=True, device="cpu")
    shutil.rmtree(model)
    _perturbed_copy(model_dir["llama"], model)
    second = archive.evaluate(str(model), ["en"], "nll", data["math"], name="m", all_items=True, device="cpu")
    assert second.written and not second.reused
    values = archive.sql("SELECT eval_id, value, weights_sha256 FROM evaluations ORDER BY created_at")
    assert values["value"][0] != values["value"][1] and values["weights_sha256"].n_unique() == 2
    assert first.written[0] == values["eval_id"][0]


def test_other_weights_under_an_archived_name_fail_before_loading(archive_copy, model_dir, data, tmp_path,
                                                                  monkeypatch):
    from mlarch.ingest import loading

    other = _perturbed_copy(model_dir["llama"], tmp_path / "tiny-llama")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load", no_load)
    with pytest.raises(mlarch.errors.UsageError, match="other weights"):
        mlarch.open(archive_copy).evaluate(str(other), ["en"], "nll", data["math"], device="cpu")


def _math_run(archive, lang="en", role="math"):
    return archive.sql("SELECT run_id FROM runs WHERE lang = ? AND role = ? AND in_use", [lang, role])["run_id"][0]


def test_edited_drawn_items_are_refused(archive_copy, model_dir, data):
    archive = mlarch.open(archive_copy)
    run_id = _math_run(archive)
    archive.sql("UPDATE run_samples SET item_index = (item_index + 1) % 10 WHERE run_id = ? AND position = 0",
                [run_id], write=True)
    code, output = _run(archive_copy, "eval", "--model", str(model_dir["llama"]), "--langs", "en", "--task", "nll",
                        "--data", data["math"], "-q")
    assert code == 1 and f"run {run_id}'s record changed" in output and len(output.strip().splitlines()) == 1
    assert archive.sql("SELECT count(*) AS n FROM evaluations")["n"][0] == 0


def test_held_out_covers_either_role(archive_copy, model_dir, data):
    archive = mlarch.open(archive_copy)
    drawn = set(archive.sql("SELECT item_index FROM run_samples WHERE run_id = ?",
                            [_math_run(archive, role="control")])["item_index"])
    result = archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["control"], device="cpu")  # role math
    items = set(archive.evaluation_items(result.written[0])["item_index"])
    assert drawn and items and not items & drawn


def test_edited_evaluations_are_neither_reused_nor_trusted(archive_copy, model_dir, data):
    archive = mlarch.open(archive_copy)
    args = (str(model_dir["llama"]), ["en"], "accuracy", data["math"])
    result = archive.evaluate(*args, shots=1, max_new_tokens=4, all_items=True, device="cpu")
    eval_id = result.written[0]
    archive.sql("UPDATE evaluation_items SET correct = true WHERE eval_id = ? AND position < 3", [eval_id], write=True)
    with pytest.raises(mlarch.errors.MlarchError, match="cannot be reused"):
        archive.evaluate(*args, shots=1, max_new_tokens=4, all_items=True, device="cpu")
    code, output = _run(archive_copy, "ingest", "--model", str(model_dir["llama"]), "--langs", "en", "--math",
                        data["math"], "--control", data["control"], "--samples", "4", "--top-k", "0.01,0.05,0.25",
                        "--only-correct", eval_id, "-q", "--force")
    assert code == 1 and "record changed" in output, output
    before = archive.sql("SELECT count(*) AS n FROM runs")["n"][0]
    assert before == 6  # nothing ingested


def test_an_overflowing_scale_is_not_archived_as_a_number(archive_copy, model_dir, data):
    archive = mlarch.open(archive_copy)
    with pytest.raises(mlarch.errors.MlarchError, match="overflowed"):
        archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], interventions=["scale:en@0.25:1e38"],
                         device="cpu")
    statuses = archive.sql("SELECT intervention, status, value FROM evaluations ORDER BY created_at")
    assert statuses.rows() == [("none", "FINISHED", statuses["value"][0]), ("scale", "FAILED", None)]


def test_a_long_prompt_is_a_usage_error_before_any_row(archive_copy, model_dir, data):
    code, output = _run(archive_copy, "eval", "--model", str(model_dir["llama"]), "--langs", "en", "--task",
                        "accuracy", "--data", data["math"], "--shots", "2", "--max-length", "10", "-q")
    assert code == 2 and "--max-length" in output and len(output.strip().splitlines()) == 1, output
    assert mlarch.open(archive_copy).sql("SELECT count(*) AS n FROM evaluations")["n"][0] == 0


@pytest.mark.skipif(not (SHARED / "gsm8k" / "test.jsonl").exists(), reason="../shared/data is not here")
def test_translated_gsm8k_is_scored_against_the_english_numbers():
    from mlarch.evaluation import answers
    from mlarch.ingest import sources

    source = sources.resolve("gsm8k", SHARED)
    english = [answers.reference(a) for _, a in source.load("en", "math").pairs[:1319]]
    for lang in ("de", "hi"):
        own = [answers.reference(a) for _, a in source.load(lang, "math").pairs]
        refs, files = source.reference_answers(lang)
        assert [answers.reference(a) for a in refs] == english and list(files) == ["gsm8k/test.jsonl"]
        assert sum(o != e for o, e in zip(own, english)) > 10  # the translations' own numbers are garbled


def test_a_schema_2_archive_upgrades_and_evaluates(archive_copy, model_dir, data):
    """An archive of the previous release (schema 2: no evaluation tables) migrates on first
    use, verifies clean and takes evaluations."""
    import duckdb

    from mlarch.store import catalog, maintenance

    from old_archives import downgrade_to_schema_3

    downgrade_to_schema_3(archive_copy)
    con = duckdb.connect(str(archive_copy / "catalog.duckdb"))
    for view in ("intervention_effects", "accuracy", "evaluations_current"):
        con.execute(f"DROP VIEW {view}")
    con.execute("DROP TABLE evaluation_items")
    con.execute("DROP TABLE evaluations")
    con.execute("DELETE FROM schema_migrations WHERE version > 2")
    con.close()
    archive = mlarch.open(archive_copy)
    assert archive.sql("SELECT max(version) AS v FROM schema_migrations")["v"][0] == catalog.latest_version()
    assert all(c.ok for c in maintenance.verify(archive.root))
    result = archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], interventions=["prune:de@0.05"],
                              device="cpu")
    assert len(result.written) == 2
    assert archive.sql("SELECT count(*) AS n FROM intervention_effects")["n"][0] == 1


def test_a_named_source_serving_both_roles_holds_out_each_roles_items(tmp_path, model_dir):
    """`starter` reads other files per role under one name: the control evaluation holds out
    the control run's items and is not refused for the math run's other files."""
    archive = mlarch.open(tmp_path / "a")
    archive.ingest(str(model_dir["llama"]), ["en"], "starter", "starter", samples=8, top_k=[0.05, 0.25],
                   device="cpu")
    drawn = set(archive.sql("SELECT item_index FROM run_samples WHERE run_id = ?",
                            [_math_run(archive, role="control")])["item_index"])
    result = archive.evaluate(str(model_dir["llama"]), ["en"], "nll", "starter", role="control",
                              interventions=["prune:en@0.05"], device="cpu")
    items = set(archive.evaluation_items(result.written[0])["item_index"])
    assert drawn and items and not items & drawn and len(items) == 24 - len(drawn)


@pytest.mark.parametrize("task", ["accuracy", "nll"])
def test_a_scale_that_overflows_the_weights_is_refused_for_every_task(archive_copy, model_dir, data, task):
    """x 1e45 makes every scaled float32 weight inf: greedy decoding over NaN logits would
    still give completions (accuracy 0.0), so the intervention itself refuses."""
    archive = mlarch.open(archive_copy)
    options = {"shots": 0, "max_new_tokens": 2} if task == "accuracy" else {}
    with pytest.raises(mlarch.errors.MlarchError, match="overflow to inf or NaN in torch.float32"):
        archive.evaluate(str(model_dir["llama"]), ["en"], task, data["math"], interventions=["scale:en@0.25:1e45"],
                         device="cpu", **options)
    statuses = archive.sql("SELECT intervention, status, value FROM evaluations ORDER BY created_at")
    assert statuses.rows() == [("none", "FINISHED", statuses["value"][0])]  # refused before its row


def test_the_same_data_at_another_path_is_still_held_out(archive_copy, model_dir, data, tmp_path):
    """Byte-identical files elsewhere (the archive and its data moved to another machine) are
    the same items: the runs' drawn items stay out of the evaluation."""
    import shutil

    archive = mlarch.open(archive_copy)
    math = Path(data["math"])
    moved = tmp_path / "moved"
    shutil.copytree(math.parent, moved)
    drawn = set(archive.sql("SELECT item_index FROM run_samples WHERE run_id = ?", [_math_run(archive)])["item_index"])
    result = archive.evaluate(str(model_dir["llama"]), ["en"], "nll", str(moved / math.name), device="cpu")
    items = set(archive.evaluation_items(result.written[0])["item_index"])
    assert drawn and items and not items & drawn
    provenance = json.loads(archive.sql("SELECT provenance FROM evaluations WHERE eval_id = ?",
                                        [result.written[0]])["provenance"][0])
    assert _math_run(archive) in provenance["held_out_runs"]


def test_a_scale_that_rounds_away_in_bfloat16_is_refused(archive_copy, model_dir, data):
    """x1.001 in bfloat16 rounds every weight back to itself: a row would record a change that
    never happened (and a value equal to the baseline's)."""
    archive = mlarch.open(archive_copy)
    with pytest.raises(mlarch.errors.MlarchError, match="scaling by 1.001 changes no weight: in torch.bfloat16"):
        archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], interventions=["scale:en@0.25:1.001"],
                         dtype="bfloat16", limit=2, device="cpu")
    assert archive.sql("SELECT intervention FROM evaluations")["intervention"].to_list() == ["none"]
    done = archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], interventions=["scale:en@0.25:1.1"],
                            dtype="bfloat16", limit=2, device="cpu")
    assert len(done.written) == 1  # a factor bfloat16 can hold still runs


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_text_past_gpt2_positions_is_refused_before_any_row(tmp_path, model_dir, kind):
    """The tiny GPT-2 has 256 learned positions; --max-length 512 (the default) lets a long
    text reach the forward pass, which fails with an IndexError: refused up front instead.
    The tiny Llama's rotary positions past its 256 would be extrapolated: refused alike."""
    data = tmp_path / "en.jsonl"
    data.write_text(json.dumps({"question": " ".join(["apples"] * 400), "answer": "#### 4"}) + "\n"
                    + json.dumps({"question": "q2", "answer": "#### 5"}) + "\n")
    code, output = _run(tmp_path / "arch", "eval", "--model", str(model_dir[kind]), "--langs", "en", "--task", "nll",
                        "--data", str(tmp_path / "{lang}.jsonl"), "--all-items", "-q")
    assert code == 2 and "more than the model's 256 positions: pass --max-length 256 or less" in output, output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "arch" / "catalog.duckdb").exists()
    code, output = _run(tmp_path / "arch", "eval", "--model", str(model_dir[kind]), "--langs", "en", "--task", "nll",
                        "--data", str(tmp_path / "{lang}.jsonl"), "--all-items", "--max-length", "256", "-q")
    assert code == 0, output


def test_a_generation_past_gpt2_positions_is_refused_before_any_row(tmp_path, model_dir):
    """A prompt that fits the 256 positions, plus --max-new-tokens, may not: generate() fails
    with an IndexError part-way, after earlier batches ran. Refused up front with the room left."""
    data = tmp_path / "en.jsonl"
    data.write_text("\n".join(json.dumps({"question": " ".join(["apples"] * n), "answer": "#### 4"}) for n in (3, 200)))
    args = ["eval", "--model", str(model_dir["gpt2"]), "--langs", "en", "--task", "accuracy", "--data",
            str(tmp_path / "{lang}.jsonl"), "--all-items", "--shots", "0", "--batch-size", "1", "-q"]
    code, output = _run(tmp_path / "arch", *args, "--max-new-tokens", "200")
    assert code == 2 and output.startswith("Error: the en prompt of item 1 has 205 tokens; with --max-new-tokens 200 "
                                           "its generation would pass the model's 256 positions: pass "
                                           "--max-new-tokens 51 or less, or fewer --shots"), output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "arch" / "catalog.duckdb").exists()
    code, output = _run(tmp_path / "arch", *args, "--max-new-tokens", "51")
    assert code == 0, output


# --- options that would be ignored, seeds without held-out items, a second label for prune ------

def _no_load(monkeypatch):
    """Any model load fails the test: the refusals below come before it."""
    from mlarch.ingest import loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load", no_load)


def _one_error_line(code, output, expected_code=2) -> str:
    lines = output.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("flag, value, keyword", [("--shots", "8", "shots"), ("--shots", "0", "shots"),
                                                  ("--max-new-tokens", "256", "max_new_tokens")])
def test_accuracy_options_with_nll_are_refused_not_ignored(tmp_path, model_dir, data, monkeypatch, flag, value,
                                                           keyword):
    """nll never reads --shots or --max-new-tokens: a value given (even the default's) is refused,
    before any work; the same keyword in Python alike."""
    _no_load(monkeypatch)
    root = tmp_path / "arch"
    code, output = _run(root, "eval", "--model", str(model_dir["llama"]), "--langs", "en", "--task", "nll",
                        "--data", data["math"], flag, value, "-q")
    assert _one_error_line(code, output) == (f"Error: {flag} applies to --task accuracy only: drop it, or use "
                                             "--task accuracy")
    assert not root.exists()
    with pytest.raises(mlarch.errors.UsageError) as caught:
        mlarch.open(root).evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], device="cpu",
                                   **{keyword: int(value)})
    assert str(caught.value) == f"{keyword}= applies to task='accuracy' only: drop it, or use task='accuracy'"
    assert not root.exists()


def test_help_still_shows_the_accuracy_defaults():
    result = CliRunner().invoke(cli, ["eval", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "exemplars in each prompt [default: 8]" in result.output
    assert "tokens generated at most [default: 256]" in result.output


def test_the_defaults_left_unsaid_keep_the_recorded_numbers(archive_copy, model_dir, data, monkeypatch):
    """shots/max_new_tokens are None until given: accuracy's identity (what finds an archived
    evaluation again) holds 8 and 256 as before, the same digest as with them given; nll's
    identity holds neither and its provenance the numbers it always recorded."""
    from mlarch.evaluation import pipeline

    archive = mlarch.open(archive_copy)
    model = str(model_dir["llama"])
    units, real = [], pipeline._units

    class Stop(Exception):
        pass

    def spy(*args):
        units.append(real(*args))
        raise Stop  # before the model loads (8 shots and 256 tokens overflow the tiny model's positions)

    monkeypatch.setattr(pipeline, "_units", spy)
    for options in ({}, {"shots": 8, "max_new_tokens": 256}):
        with pytest.raises(Stop):
            archive.evaluate(model, ["en"], "accuracy", data["math"], limit=1, device="cpu", **options)
    left, given = (u[0] for u in units)
    assert left.config_digest == given.config_digest and left.baseline_key == given.baseline_key
    assert (left.identity["shots"], left.identity["max_new_tokens"]) == (8, 256)
    monkeypatch.setattr(pipeline, "_units", real)
    nll = archive.evaluate(model, ["en"], "nll", data["math"], limit=2, device="cpu")
    scored = json.loads(archive.sql("SELECT provenance FROM evaluations")["provenance"][0])
    assert "shots" not in scored["identity"] and "max_new_tokens" not in scored["identity"]
    assert (scored["config"]["shots"], scored["config"]["max_new_tokens"]) == (8, 256)
    assert archive.evaluate(model, ["en"], "nll", data["math"], limit=2, device="cpu").reused == nll.written


def _en_args(model_dir, data, *extra):
    return ["eval", "--model", str(model_dir["llama"]), "--langs", "en", "--task", "nll", "--data", data["math"],
            "-q", *extra]


def test_a_seed_without_runs_is_refused_not_left_without_held_out_items(archive_copy, model_dir, data, monkeypatch,
                                                                        tmp_path):
    """Runs of tiny-llama drew en items at seeds 1 and 2, none at 7: --seed 7 would hold out
    nothing and score the items the sets were made from. Refused, naming the seeds, before
    the model loads; with --intervene the sets at seed 7 are missing first, and the error
    names the archived seeds too."""
    archive = mlarch.open(archive_copy)
    archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=6, seeds=[2],
                   top_k=[0.01, 0.05, 0.25], device="cpu")
    _no_load(monkeypatch)
    code, output = _run(archive_copy, *_en_args(model_dir, data, "--seed", "7"))
    assert _one_error_line(code, output) == (
        f"Error: 'tiny-llama' has no run of en at seed 7, so none of the items of {data['math']!r} (math) would be "
        "held out; seeds whose runs drew from them: 1, 2: pass --seed 1, or --all-items to evaluate every item")
    # the same items under another path are the same data (by their digests)
    copied = tmp_path / "copied"
    shutil.copytree(Path(data["math"]).parent, copied)
    code, output = _run(archive_copy, "eval", "--model", str(model_dir["llama"]), "--langs", "en", "--task", "nll",
                        "--data", str(copied / Path(data["math"]).name), "--seed", "7", "-q")
    assert "seeds whose runs drew from them: 1, 2" in _one_error_line(code, output), output
    code, output = _run(archive_copy, *_en_args(model_dir, data, "--seed", "7", "--intervene", "prune:en@0.05"))
    assert _one_error_line(code, output) == (
        "Error: model 'tiny-llama' has no archived math and control runs for 'en' at seed 7 in analysis "
        "'math-vs-control', so no math-only set to intervene on: pass --seed 1 (archived seeds: 1, 2), or ingest "
        "en with --seeds 7 first (see `mlarch runs`)")
    # seed 2: en has its runs, de none (its items were drawn at seed 1 only)
    code, output = _run(archive_copy, "eval", "--model", str(model_dir["llama"]), "--langs", "en,de", "--task", "nll",
                        "--data", data["math"], "--seed", "2", "--intervene", "prune:en@0.05", "-q")
    assert _one_error_line(code, output).startswith(
        f"Error: 'tiny-llama' has no run of de at seed 2, so none of the items of {data['math']!r} (math) would be "
        "held out; seeds whose runs drew from them: 1: pass --seed 1, or --all-items"), output
    with pytest.raises(mlarch.errors.UsageError, match="drew from them: 1, 2: pass seed=1, or all_items=True to "):
        archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], seed=7, device="cpu")
    assert archive.sql("SELECT count(*) AS n FROM evaluations")["n"][0] == 0


def test_a_seed_without_runs_still_evaluates_every_item_or_a_model_without_runs(archive_copy, model_dir, data,
                                                                                  tmp_path):
    """--all-items holds nothing out, so the seed names no items: evaluated. A model with no runs
    at all (a baseline of any model) has nothing to hold out at any seed: evaluated as before."""
    code, output = _run(archive_copy, *_en_args(model_dir, data, "--seed", "7", "--all-items"))
    assert code == 0, output
    archive = mlarch.open(archive_copy)
    assert archive.sql("SELECT seed, n_items FROM evaluations").rows() == [(7, 10)]
    fresh = mlarch.open(tmp_path / "fresh")
    done = fresh.evaluate(str(model_dir["qwen2"]), ["en"], "nll", data["math"], seed=7, limit=2, device="cpu")
    assert len(done.written) == 1
    provenance = json.loads(fresh.sql("SELECT provenance FROM evaluations")["provenance"][0])
    assert provenance["held_out_runs"] == []
    # another model's runs are not this one's: the qwen2 evaluation in the llama archive runs too
    assert archive.evaluate(str(model_dir["qwen2"]), ["en"], "nll", data["math"], seed=7, limit=2,
                            device="cpu").written
    # data no run drew from, at any seed, has nothing to hold out at seed 7 either
    other = tmp_path / "other" / "en.jsonl"
    other.parent.mkdir()
    other.write_text("".join(json.dumps({"question": f"{n}+1?", "answer": f"#### {n + 1}"}) + "\n" for n in range(3)))
    assert archive.evaluate(str(model_dir["llama"]), ["en"], "nll", str(other.parent / "{lang}.jsonl"), seed=7,
                            device="cpu").written
    # a seed whose runs (another analysis) drew other data: its sets never saw these items, so
    # evaluating them there with its interventions is sound, not refused
    archive.ingest(str(model_dir["llama"]), ["en"], str(other.parent / "{lang}.jsonl"), data["control"], samples=2,
                   seeds=[3], top_k=[0.05], device="cpu", analysis="other-math")
    done = archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], seed=3, analysis="other-math",
                            interventions=["prune:en@0.05"], limit=2, device="cpu")
    assert len(done.written) == 2
    # a damaged record at another seed is verify's to report: it does not block this seed
    archive.sql("UPDATE runs SET provenance = '\"x\"' WHERE seed = 3 AND role = 'math'", write=True)
    assert archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], seed=1, limit=3,
                            device="cpu").written
    with pytest.raises(mlarch.errors.UsageError, match="drew from them: 1: pass seed=1"):  # the hint skips it
        archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], seed=9, device="cpu")


@pytest.mark.parametrize("spec, words", [
    ("scale:en@0.01:0", "Error: the factor '0' in 'scale:en@0.01:0' scales by 0, which is pruning: use prune:en@0.01"),
    ("scale:en@0.0500:-0.0", "Error: the factor '-0.0' in 'scale:en@0.0500:-0.0' scales by 0, which is pruning: use "
                             "prune:en@0.05"),
    ("scale:en@0.01:nan", "Error: the factor 'nan' in 'scale:en@0.01:nan' is not a finite number"),
    ("scale:en@0.01:-inf", "Error: the factor '-inf' in 'scale:en@0.01:-inf' is not a finite number"),
    ("fraction:en@0.01:inf", "Error: the factor 'inf' in 'fraction:en@0.01:inf' is not a finite number"),
])
def test_scale_by_zero_is_prune_under_one_label(archive_copy, model_dir, data, monkeypatch, spec, words):
    """x0 is pruning: two labels for one intervention would archive it twice and split its
    effects. Refused (and non-finite factors) before any work, pointing at prune."""
    _no_load(monkeypatch)
    code, output = _run(archive_copy, *_en_args(model_dir, data, "--intervene", spec))
    assert _one_error_line(code, output).startswith(words), output
    assert mlarch.open(archive_copy).sql("SELECT count(*) AS n FROM evaluations")["n"][0] == 0
    with pytest.raises(mlarch.errors.UsageError, match="scales by 0, which is pruning: use prune:en@0.01"):
        mlarch.evaluation.interventions.Intervention("scale", "en", 0.01, 0)


def test_only_the_runs_in_use_are_held_out(model_dir, data, tmp_path):
    """Runs a --force re-ingest replaced stay FINISHED, not in use. After the data files changed
    (an item edited), the runs in use drew from the new files: the eval holds out their items
    and is not refused over the replaced runs' old files."""
    folder = tmp_path / "data"
    shutil.copytree(Path(data["math"]).parent, folder)
    math = str(folder / Path(data["math"]).name)
    archive = mlarch.open(tmp_path / "a")
    args = (str(model_dir["llama"]), ["en"], math, data["control"])
    archive.ingest(*args, samples=4, top_k=[0.05], device="cpu")
    old = _math_run(archive)
    lines = (folder / "en.jsonl").read_text().splitlines()
    item = json.loads(lines[0])
    lines[0] = json.dumps({**item, "question": item["question"] + " (edited)"})
    (folder / "en.jsonl").write_text("\n".join(lines) + "\n")
    archive.ingest(*args, samples=4, top_k=[0.05], device="cpu", force=True)
    new = _math_run(archive)
    runs = archive.sql("SELECT run_id, in_use, status FROM runs WHERE role = 'math'").rows()
    assert sorted(runs) == sorted([(old, False, "FINISHED"), (new, True, "FINISHED")])
    drawn = set(archive.sql("SELECT item_index FROM run_samples WHERE run_id = ?", [new])["item_index"])
    result = archive.evaluate(str(model_dir["llama"]), ["en"], "nll", math, device="cpu")
    assert set(archive.evaluation_items(result.written[0])["item_index"]) == set(range(len(lines))) - drawn
    provenance = json.loads(archive.sql("SELECT provenance FROM evaluations")["provenance"][0])
    assert provenance["held_out_runs"] == [new]


def test_n_params_changed_counts_the_weights_that_changed(model_dir, data, tmp_path):
    """In bfloat16, x1.003 rounds some scaled weights back to themselves: the row counts the
    weights the evaluation really ran with changed (as its provenance), not every entry of the set."""
    archive = mlarch.open(tmp_path / "a")
    archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=4, top_k=[0.25],
                   device="cpu", dtype="bfloat16")
    archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], interventions=["scale:en@0.25:1.003"],
                     limit=2, device="cpu", dtype="bfloat16")
    row = archive.sql("SELECT n_set, n_params_changed, provenance FROM evaluations WHERE intervention = 'scale'"
                      ).to_dicts()[0]
    from transformers import AutoModelForCausalLM

    from mlarch.ingest.scoring import scored_modules

    modules = scored_modules(AutoModelForCausalLM.from_pretrained(str(model_dir["llama"]), dtype=torch.bfloat16))
    moved = 0
    for m in modules:
        weights = m.scored_weight().detach()
        inside = torch.from_numpy(archive.selection("tiny-llama", "en", 0.25, m.name)).to(torch.bool)
        moved += int(((weights * 1.003 != weights) & inside).sum())
    assert 0 < moved < row["n_set"]  # the case happens
    assert row["n_params_changed"] == moved
    recorded = json.loads(row["provenance"])["intervention"]
    assert (recorded["n_changed"], recorded["n_entries"], recorded["n_set"]) == (moved, row["n_set"], row["n_set"])
