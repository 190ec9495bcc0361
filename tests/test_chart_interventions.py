"""`mlarch chart interventions` and the report's interventions section: evaluations of
`mlarch eval` (inserted here as `mlarch eval` would write them) against their baselines."""

import json
import re
import uuid
from pathlib import Path
from datetime import datetime, timedelta

import pytest
from click.testing import CliRunner

import mlarch
from mlarch import charts
from mlarch.charts import kinds
from mlarch.cli import cli

LANGS = ["en", "de", "bn"]
FORMATS = ["svg", "png", "pdf", "html", "json"]
MODEL = "tiny-llama"
NLL_BASE = {"en": 1.80, "de": 2.10, "bn": 2.60}
ACC_BASE = {"en": 0.60, "de": 0.50, "bn": 0.30}
SET_SIZE = {"en": 120, "de": 150, "bn": 90}  # math-only set size at k = 0.01
T0 = datetime(2025, 3, 1, 12, 0, 0)
COLUMNS = ["eval_id", "model", "task", "dataset", "role", "lang", "intervention", "target_lang", "k", "seed",
           "factor", "n_set", "n_params_changed", "n_items", "n_tokens", "value", "stderr", "status",
           "created_at", "finished_at", "config_digest", "baseline_key", "provenance"]


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def rows(spec):
    """Every inline data row of a Vega-Lite spec (altair moves them to `datasets`)."""
    found = [row for values in spec.get("datasets", {}).values() for row in values]

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("data"), dict) and "values" in node["data"]:
                found.extend(node["data"]["values"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk({k: v for k, v in spec.items() if k != "datasets"})
    return found


def encodings(node, channel):
    """Every encoding of `channel` anywhere in a spec."""
    found = []
    if isinstance(node, dict):
        enc = node.get("encoding")
        if isinstance(enc, dict) and channel in enc:
            found.append(enc[channel])
        for value in node.values():
            found += encodings(value, channel)
    elif isinstance(node, list):
        for value in node:
            found += encodings(value, channel)
    return found


# --- evaluations as `mlarch eval` writes them ------------------------------------------------
def effect(target, lang, k):
    """Relative damage of pruning `target`'s set on `lang`: strongest on the own language,
    and asymmetric (target and lang weigh differently), growing with k."""
    ti, li = LANGS.index(target), LANGS.index(lang)
    own = 0.20 + 0.05 * ti if target == lang else 0.03 + 0.01 * ti + 0.025 * li
    return own * (k / 0.01) ** 0.5


def null_effect(target, lang, k):
    return (0.008 + 0.002 * LANGS.index(target) + 0.001 * LANGS.index(lang)) * (k / 0.01) ** 0.5


def evaluation(task, lang, intervention, value, *, target=None, k=None, seed=1, factor=None, status="FINISHED",
               minutes=0, digest=None, dataset="mgsm", role="math"):
    n_set = None if target is None else round(SET_SIZE[target] * k / 0.01)
    created = T0 + timedelta(minutes=minutes)
    config = digest or f"cfg-{task}-{dataset}-{role}-{seed}-{lang}-{intervention}-{target}-{k}-{factor}"
    return {"eval_id": uuid.uuid4().hex[:16], "model": MODEL, "task": task, "dataset": dataset, "role": role,
            "lang": lang, "intervention": intervention, "target_lang": target, "k": k, "seed": seed,
            "factor": factor, "n_set": n_set, "n_params_changed": 0 if target is None else n_set,
            "n_items": 40, "n_tokens": 4000 if task == "nll" else 1200, "value": value,
            "stderr": 0.01, "status": status, "created_at": created,
            "finished_at": created + timedelta(minutes=3) if status != "RUNNING" else None,
            "config_digest": config, "baseline_key": f"base-{task}-{dataset}-{role}-{seed}-{lang}",
            "provenance": json.dumps({"mlarch": mlarch.__version__})}


def insert(archive, records):
    # as `mlarch eval` writes them: the weights evaluated and the runs whose sets were used
    pairs = {lang: (m, c) for lang, m, c in archive.sql(
        "SELECT DISTINCT lang, math_run_id, control_run_id FROM selections WHERE seed = 1").iter_rows()}
    analysis = archive.sql("SELECT min(analysis) AS a FROM analyses")["a"][0]  # whose sets were changed
    for record in records:
        record.setdefault("weights_sha256", "0" * 64)
        target = record.get("target_lang")
        run_ids = pairs.get(target, (f"run-{target}-math", f"run-{target}-control")) if target else (None, None)
        record.setdefault("math_run_id", run_ids[0])
        record.setdefault("control_run_id", run_ids[1])
        record.setdefault("analysis", analysis if target else None)
    columns = COLUMNS + ["weights_sha256", "math_run_id", "control_run_id", "analysis"]
    values = ", ".join("(" + ", ".join("?" for _ in columns) + ")" for _ in records)
    params = [record[c] for record in records for c in columns]
    archive.sql(f"INSERT INTO evaluations ({', '.join(columns)}) VALUES {values}", params, write=True)


def standard_evaluations():
    """NLL: baselines, prune for every target x lang at k 0.01 and 0.05, the random null;
    accuracy: baselines and prune at k 0.01. Plus a superseded rerun, a failed and a running one."""
    out = []
    minute = 0
    for lang in LANGS:
        out.append(evaluation("nll", lang, "none", NLL_BASE[lang], minutes=minute))
        out.append(evaluation("accuracy", lang, "none", ACC_BASE[lang], minutes=minute))
    for k in (0.01, 0.05):
        for target in LANGS:
            for lang in LANGS:
                minute += 1
                out.append(evaluation("nll", lang, "prune", round(NLL_BASE[lang] * (1 + effect(target, lang, k)), 6),
                                      target=target, k=k, minutes=minute))
                out.append(evaluation("nll", lang, "random",
                                      round(NLL_BASE[lang] * (1 + null_effect(target, lang, k)), 6),
                                      target=target, k=k, minutes=minute))
    for target in LANGS:
        for lang in LANGS:
            out.append(evaluation("accuracy", lang, "prune",
                                  round(ACC_BASE[lang] * (1 - effect(target, lang, 0.01)), 4),
                                  target=target, k=0.01, minutes=minute))
    # an older run of one configuration, replaced by a --force rerun (the newest counts) ...
    stale = evaluation("nll", "de", "prune", 9.99, target="en", k=0.01, minutes=-100)
    stale["config_digest"] = next(r["config_digest"] for r in out if (r["lang"], r["intervention"], r["target_lang"],
                                                                      r["k"]) == ("de", "prune", "en", 0.01))
    # ... and a failed and a running evaluation, which no chart shows
    failed = evaluation("nll", "bn", "prune", 42.0, target="de", k=0.01, status="FAILED", minutes=500,
                        digest="cfg-failed")
    running = evaluation("nll", "en", "prune", 42.0, target="bn", k=0.05, status="RUNNING", minutes=501,
                         digest="cfg-running")
    return out + [stale, failed, running]


@pytest.fixture
def evaluated(archive_copy):
    archive = mlarch.open(archive_copy)
    records = standard_evaluations()
    insert(archive, records)
    return archive_copy, records


def expected_changes(records, task="nll", intervention="prune", k=0.01):
    """(heatmap row, evaluated lang) -> relative change, from the inserted rows alone."""
    current = {}
    for r in records:
        if r["status"] != "FINISHED":
            continue
        old = current.get(r["config_digest"])
        if old is None or r["finished_at"] > old["finished_at"]:
            current[r["config_digest"]] = r
    base = {r["lang"]: r["value"] for r in current.values() if r["task"] == task and r["intervention"] == "none"}
    out = {}
    for r in current.values():
        if r["task"] != task or r["k"] != k:
            continue
        if r["intervention"] == intervention:
            out[(r["target_lang"], r["lang"])] = (r["value"] - base[r["lang"]]) / base[r["lang"]]
        elif intervention == "prune" and r["intervention"] == "random":
            out[(f"random:{r['target_lang']}", r["lang"])] = (r["value"] - base[r["lang"]]) / base[r["lang"]]
    return out


def heat_cells(spec):
    return {(r["row"], r["lang"]): r["relative_change"] for r in rows(spec) if "row" in r}


def line_points(spec):
    return {(r["series"], r["lang"], r.get("k")): r["value"] for r in rows(spec) if "series" in r}


# --- the chart ----------------------------------------------------------------------------------
def test_archive_has_the_model_and_no_evaluations(archive_copy):
    archive = mlarch.open(archive_copy)
    assert archive.models()["model"].to_list() == [MODEL]
    assert archive.sql("SELECT count(*) AS n FROM evaluations")["n"][0] == 0


def test_heatmap_values_are_relative_changes_vs_baseline(evaluated):
    root, records = evaluated
    archive = mlarch.open(root)
    chart = archive.chart("interventions", model="llama")
    spec = chart.to_dict()
    plotted = heat_cells(spec)
    expected = expected_changes(records)
    assert plotted.keys() == expected.keys() and len(plotted) == 18  # 9 prune + 9 random null cells
    for key, value in expected.items():
        assert plotted[key] == pytest.approx(value, rel=1e-9), key
    # own-language pruning hurts most, and the superseded rerun (9.99) and failed/running rows are not shown
    assert plotted[("en", "en")] > plotted[("en", "de")] > 0
    assert all(abs(v) < 1 for v in plotted.values())
    # same numbers as the view
    view = archive.sql("SELECT target_lang, lang, relative_change FROM intervention_effects "
                       "WHERE task = 'nll' AND intervention = 'prune' AND k = 0.01")
    assert {(r["target_lang"], r["lang"]): r["relative_change"] for r in view.iter_rows(named=True)} == \
        pytest.approx({key: v for key, v in plotted.items() if not key[0].startswith("random")})
    heat = spec["hconcat"][0]
    y = encodings(heat, "y")[0]
    assert y["field"] == "row" and y["sort"] == LANGS + [f"random:{x}" for x in LANGS]
    assert encodings(heat, "x")[0]["field"] == "lang"
    color = next(c for c in encodings(heat, "color") if c.get("field") == "relative_change")
    assert color["scale"]["domainMid"] == 0 and color["scale"]["domain"][0] == -color["scale"]["domain"][1]
    text = next(t for t in encodings(heat, "text"))
    assert text["field"] == "relative_change" and "%" in text["format"]
    subtitle = " ".join(spec["title"]["subtitle"])
    for part in (MODEL, "NLL", "mgsm", "seed 1", "k = 0.01", "random:<lang>"):
        assert part in subtitle, part
    assert "interventions" in charts.KINDS


def test_lines_show_own_set_random_null_dashed_and_baseline(evaluated):
    root, records = evaluated
    spec = charts.build(mlarch.open(root), "interventions", model="tiny", langs=["bn", "en"]).to_dict()
    lines = spec["hconcat"][1]
    own, null, base = kinds.own_series(charts.data.resolve_evaluations(mlarch.open(root), "tiny")), \
        kinds.NULL_SERIES, kinds.BASELINE_SERIES
    points = line_points(spec)
    for lang in ("bn", "en"):
        for k in (0.01, 0.05):
            assert points[(own, lang, k)] == pytest.approx(NLL_BASE[lang] * (1 + effect(lang, lang, k)), rel=1e-6)
            assert points[(null, lang, k)] == pytest.approx(NLL_BASE[lang] * (1 + null_effect(lang, lang, k)),
                                                            rel=1e-6)
        assert points[(base, lang, None)] == NLL_BASE[lang]
    assert {lang for (_, lang, _) in points} == {"bn", "en"}  # langs filter the evaluated languages
    assert not any(s == own and v == 9.99 for (s, _, _), v in points.items())
    # only each language's own set on the lines: 2 langs x 2 k x (own + null) + 2 baselines
    assert len(points) == 10
    dash = [d for d in encodings(lines, "strokeDash") if d.get("field") == "series"][0]
    pattern = dict(zip(dash["scale"]["domain"], [tuple(x) for x in dash["scale"]["range"]]))
    assert pattern[own] in ((1, 0),) and len(set(pattern[null])) == 2  # solid vs dashed
    assert pattern[null] != pattern[own] and pattern[base] not in (pattern[own], pattern[null])
    nulls = [r for r in rows(spec) if r.get("series") == null]
    assert nulls and {r["intervention"] for r in nulls} == {"random"}
    x = [e for e in encodings(lines, "x") if e.get("field") == "k"][0]
    assert x["scale"]["type"] == "log" and x["axis"]["values"] == [0.01, 0.05]
    colors = [c for c in encodings(lines, "color") if c.get("field") == "lang"][0]
    assert colors["scale"]["domain"] == ["bn", "en"]  # --langs order is the legend order, colours stable
    assert colors["scale"]["range"] == [charts.colors.color("bn"), charts.colors.color("en")]


def test_renders_to_svg_and_json(evaluated, tmp_path):
    root, records = evaluated
    chart = charts.build(mlarch.open(root), "interventions", model="llama")
    svg = charts.save(chart, tmp_path / "i.svg").read_text()
    assert svg.startswith("<svg") and "</svg>" in svg and "random:en" in svg and "+" in svg
    spec = json.loads(charts.save(chart, tmp_path / "i.json").read_text())
    assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
    expected = expected_changes(records)
    assert heat_cells(spec) == pytest.approx(expected)


def test_options_pick_k_task_intervention_and_seed(evaluated):
    root, records = evaluated
    archive = mlarch.open(root)
    at_05 = charts.build(archive, "interventions", model="llama", k=0.05).to_dict()
    assert heat_cells(at_05) == pytest.approx(expected_changes(records, k=0.05))
    assert "k = 0.05" in " ".join(at_05["title"]["subtitle"])
    acc = charts.build(archive, "interventions", model="llama", task="accuracy").to_dict()
    assert heat_cells(acc) == pytest.approx(expected_changes(records, task="accuracy"))
    assert all(v < 0 for v in heat_cells(acc).values())  # accuracy falls
    scale = [c for c in encodings(acc["hconcat"][0], "color") if c.get("field") == "relative_change"][0]["scale"]
    assert not scale.get("reverse")  # red = worse: low accuracy, high NLL
    assert "accuracy" in " ".join(acc["title"]["subtitle"])
    rnd = charts.build(archive, "interventions", model="llama", intervention="random", dataset="mgsm:math",
                       seed=1, langs="de").to_dict()
    assert heat_cells(rnd) == pytest.approx({key: v for key, v in expected_changes(records, intervention="random")
                                             .items() if key[1] == "de"})
    assert not any(key[0].startswith("random:") for key in heat_cells(rnd))  # no null row of the null itself


def test_scale_factors_and_several_datasets(archive_copy):
    archive = mlarch.open(archive_copy)
    records = [evaluation("nll", x, "none", NLL_BASE[x]) for x in LANGS]
    for factor in (0.5, 2.0):
        for x in LANGS:
            records.append(evaluation("nll", x, "scale", NLL_BASE[x] * (1 + factor / 10), target=x, k=0.05,
                                      factor=factor))
    insert(archive, records)
    with pytest.raises(mlarch.errors.UsageError, match=r"several factors \(0.5, 2\).*intervention=.scale=0.5."):
        charts.build(archive, "interventions", model="llama", intervention="scale")
    spec = charts.build(archive, "interventions", model="llama", intervention="scale=2").to_dict()
    assert heat_cells(spec) == pytest.approx({(x, x): 0.2 for x in LANGS})
    assert "scale 2 at k = 0.05" in " ".join(spec["title"]["subtitle"])  # the only k, not 0.01
    with pytest.raises(mlarch.errors.UsageError, match="several factors"):
        charts.build(archive, "interventions", model="llama")  # no prune: the default is the kind found
    with pytest.raises(mlarch.errors.MlarchError, match=r"no prune evaluations \(nll\).*interventions: scale"):
        charts.build(archive, "interventions", model="llama", intervention="prune")
    other = [evaluation("nll", x, "none", 3.0, dataset="flores") for x in LANGS]
    other += [evaluation("nll", x, "scale", 3.3, target=x, k=0.05, factor=2.0, dataset="flores") for x in LANGS]
    insert(archive, other)
    with pytest.raises(mlarch.errors.UsageError, match=r"several data sets \(flores:math, mgsm:math\)"):
        charts.build(archive, "interventions", model="llama", intervention="scale=2")
    flores = charts.build(archive, "interventions", model="llama", intervention="scale=2", dataset="flores")
    assert heat_cells(flores.to_dict()) == pytest.approx({(x, x): 0.1 for x in LANGS})


# --- the CLI -------------------------------------------------------------------------------------
def test_every_format_through_the_cli(evaluated, tmp_path):
    root, records = evaluated
    tmp_path = tmp_path / "out"
    for fmt in FORMATS:
        target = tmp_path / f"interventions.{fmt}"
        result = run(root, "chart", "interventions", "--model", "llama", "--task", "nll", "--intervention", "prune",
                     "--k", "0.01", "-o", str(target))
        assert result.exit_code == 0, result.output
        assert f"Wrote {target} (interventions)" in result.stdout
    assert (tmp_path / "interventions.svg").read_text().startswith("<svg")
    assert (tmp_path / "interventions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "interventions.pdf").read_bytes().startswith(b"%PDF")
    page = (tmp_path / "interventions.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html>") and not re.search(r"<script[^>]+src=", page)
    spec = json.loads((tmp_path / "interventions.json").read_text())
    assert heat_cells(spec) == pytest.approx(expected_changes(records))
    accuracy = tmp_path / "acc.json"
    result = run(root, "chart", "interventions", "--model", "llama", "--task", "accuracy", "--dataset", "mgsm",
                 "--langs", "en,de", "-o", str(accuracy))
    assert result.exit_code == 0, result.output
    assert {lang for (_, lang) in heat_cells(json.loads(accuracy.read_text()))} == {"en", "de"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["acc.json"] + [f"interventions.{f}" for f in FORMATS])


def test_help_mentions_the_new_options():
    result = CliRunner().invoke(cli, ["chart", "--help"])
    assert result.exit_code == 0
    for part in ("--task", "--intervention", "--dataset", "mlarch chart interventions"):
        assert part in result.output


@pytest.mark.parametrize("name,args,code,message", [
    ("task", ["--task", "perplexity"], 2, "unknown task 'perplexity': choose one of nll, accuracy"),
    ("intervention", ["--intervention", "ablate"], 2, "unknown intervention 'ablate'"),
    ("none", ["--intervention", "none"], 2, "'none' is the baseline"),
    ("factor", ["--intervention", "prune=0.5"], 2, "prune takes no factor"),
    ("two k", ["--k", "0.01,0.05"], 2, "single --k"),
    ("by", ["--by", "layer"], 2, "(--by layer) does not apply to interventions"),
    ("k", ["--k", "0.02"], 1, "no prune evaluations at k = 0.02"),
    ("seed", ["--seed", "7"], 1, "no prune evaluations at seed 7"),
    ("lang", ["--langs", "en,fr"], 1, "language fr was not evaluated"),
    ("dataset", ["--dataset", "gsm8k"], 1, "on data set 'gsm8k'; evaluated: mgsm:math"),
    ("kind", ["--intervention", "scale"], 1, "no scale evaluations (nll) for model tiny-llama"),
    ("model", ["--model", "gpt9"], 1, "no archived model matches 'gpt9'"),
])
def test_bad_options(evaluated, tmp_path, name, args, code, message):
    root, _ = evaluated
    before = sorted(p.name for p in tmp_path.rglob("*"))
    base = ["chart", "interventions"] + ([] if "--model" in args else ["--model", "llama"])
    result = run(root, *base, *args, "-o", str(tmp_path / "x.svg"))
    assert result.exit_code == code, result.output
    assert message in result.stderr and result.stderr.startswith("Error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_no_evaluations_is_a_one_line_error_with_the_fix(archive_copy, tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    result = run(archive_copy, "chart", "interventions", "--model", "llama", "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == ("Error: no evaluations with interventions in the archive for model tiny-llama: "
                                     "run `mlarch eval --intervene prune:en@0.01 ...` first")
    # baselines alone are not enough
    insert(mlarch.open(archive_copy), [evaluation("nll", x, "none", NLL_BASE[x]) for x in LANGS])
    result = run(archive_copy, "chart", "interventions", "--model", "llama", "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1 and "no evaluations with interventions" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--task", "--intervention", "--dataset"])
def test_eval_options_are_refused_by_other_kinds(llama_archive, tmp_path, option):
    result = run(llama_archive, "chart", "sizes", "--model", "llama", option, "nll", "-o", str(tmp_path / "s.svg"))
    assert result.exit_code == 2, result.output
    assert f"({option}) applies only to the interventions chart, not to sizes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(mlarch.errors.UsageError, match=r"task \(--task\), dataset \(--dataset\) apply only"):
        charts.build(llama_archive, "overlap", model="llama", task="nll", dataset="mgsm")


# --- the report ----------------------------------------------------------------------------------
STEMS = ["sizes", "heatmap", "overlap", "heatmap-layer", "layers", "unique", "upset"]


def report_files(out):
    return sorted(p.name for p in out.iterdir())


def test_report_without_evaluations_is_unchanged(archive_copy, tmp_path):
    out = tmp_path / "plain"
    result = run(archive_copy, "report", "--model", "llama", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert report_files(out) == sorted([f"{s}.{f}" for s in STEMS for f in ("svg", "png")] + ["index.html"])
    page = (out / "index.html").read_text()
    assert "intervention" not in page.lower() and page.count("data:image/svg+xml;base64,") == len(STEMS)


def test_report_anonymize_hides_every_absolute_path(archive_copy, data, tmp_path):
    """An archive imported from another machine records its paths (/home/bob/...), and ~
    covers only this user's: --anonymize shows every absolute path as <anonymized>/NAME, in
    the page, the reproduce command and the charts' files alike."""
    archive = mlarch.open(archive_copy)
    bob = "/home/bob/private-data/{lang}.jsonl"
    insert(archive, [evaluation("nll", lang, "none", 2.0, dataset=bob) for lang in LANGS]
           + [evaluation("nll", lang, "prune", 2.2, target="en", k=0.01, dataset=bob) for lang in LANGS])
    ours = str(Path(data["math"]).parent)  # the runs' data files, absolute
    plain, hidden = tmp_path / "plain", tmp_path / "hidden"
    assert run(archive_copy, "report", "--model", "llama", "-o", str(plain)).exit_code == 0
    result = run(archive_copy, "report", "--model", "llama", "--anonymize", "-o", str(hidden))
    assert result.exit_code == 0, result.output
    assert "interventions.svg" in report_files(hidden)

    def text(folder):
        return "\n".join(f.read_bytes().decode("utf-8", "replace") for f in sorted(folder.iterdir())
                         if f.suffix in (".html", ".svg"))

    shown = text(plain)
    assert "/home/bob/private-data" in shown and ours in shown and str(archive_copy) in shown  # the case is real
    anonymized = text(hidden)
    for secret in ("/home/bob", "private-data", ours, str(archive_copy)):
        assert secret not in anonymized, secret
    assert "&lt;anonymized&gt;/{lang}.jsonl" in anonymized and "Absolute paths are anonymized." in anonymized
    assert report_files(hidden) == report_files(plain)


def test_report_with_evaluations_has_figure_and_table(evaluated, tmp_path):
    root, records = evaluated
    out = tmp_path / "rep"
    result = run(root, "report", "--model", "llama", "-o", str(out))
    assert result.exit_code == 0, result.output
    stems = STEMS + ["interventions-nll", "interventions-accuracy"]
    assert report_files(out) == sorted([f"{s}.{f}" for s in stems for f in ("svg", "png")] + ["index.html"])
    page = (out / "index.html").read_text()
    assert page.count("data:image/svg+xml;base64,") == len(stems)
    for stem in ("interventions-nll", "interventions-accuracy"):
        assert f'<figure id="{stem}">' in page and f'href="{stem}.svg"' in page
    assert "Effects of interventions" in page
    for column in ("target_lang", "lang", "intervention", "k", "baseline", "value", "relative_change (%)",
                   "n_params_changed"):
        assert f"<th>{column}</th>" in page, column
    table = page[page.index("Effects of interventions"):]
    table = table[:table.index("</table>")]
    body = re.findall(r"<tr>(.*?)</tr>", table)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in body if "<td" in row]
    head = re.findall(r"<th>(.*?)</th>", table)
    got = {}
    for row in cells:
        r = dict(zip(head, row))
        got[(r["task"], r["intervention"], r["target_lang"], r["lang"], float(r["k"]))] = r["relative_change (%)"]
    current = [r for r in records if r["status"] == "FINISHED" and r["intervention"] != "none"
               and r["value"] != 9.99]
    assert len(got) == len(current) == 45  # 36 nll (prune + random at 2 k) + 9 accuracy
    for task in ("nll", "accuracy"):
        for k in (0.01, 0.05):
            for (row, lang), change in expected_changes(records, task=task, k=k).items():
                kind, _, target = row.rpartition(":")
                key = (task, kind or "prune", target, lang, k)
                assert got[key] == f"{100 * change:.3f}", key


def test_several_models_share_faceted_panels(archive_copy, model_dir, data, tmp_path):
    archive = mlarch.open(archive_copy)
    archive.ingest(str(model_dir["qwen2"]), LANGS, data["math"], data["control"], samples=4, top_k=[0.01, 0.05],
                   device="cpu")
    records = standard_evaluations()
    insert(archive, records)
    result = run(archive_copy, "chart", "interventions", "--model", "tiny", "-o", str(tmp_path / "x.svg"))
    assert result.exit_code == 1, result.output
    assert ("no evaluations with interventions in the archive for model tiny-qwen2 (tiny-llama has some): "
            "pass a narrower --model") in result.stderr and len(result.stderr.strip().splitlines()) == 1
    qwen = [{**r, "model": "tiny-qwen2", "eval_id": uuid.uuid4().hex[:16], "config_digest": "q" + r["config_digest"],
             "baseline_key": "q" + r["baseline_key"]} for r in records]
    insert(archive, qwen)
    spec = charts.build(archive, "interventions", model="tiny").to_dict()
    heat, lines = spec["hconcat"]
    assert heat["facet"]["row"]["field"] == "model" and lines["facet"]["row"]["field"] == "model"
    cells = {(r["model"], r["row"], r["lang"]): r["relative_change"] for r in rows(spec) if "row" in r}
    expected = expected_changes(records)
    assert cells == pytest.approx({(m, *key): v for m in ("tiny-llama", "tiny-qwen2") for key, v in expected.items()})
    assert "2 models" in spec["title"]["subtitle"][0]
    charts.save(charts.build(archive, "interventions", model="tiny"), tmp_path / "both.png")
