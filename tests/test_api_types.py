"""Wrongly typed arguments to the Python API raise mlarch's own errors (a UsageError naming the
argument, `<problem>: <fix>` on one line), never a raw TypeError, AttributeError or a DuckDB or
polars exception from deep inside a query. The CLI cannot reach these (click types its values),
so only the API checks them: k and seed (top_k, selection, compare, sizes), ids and names that
are not strings (or hold a lone surrogate, as os.fsdecode makes of bytes that are not UTF-8),
language lists, SQL text and params, paths, and the options of ingest and evaluate (checked
before any work)."""

import os

import pytest

import mlarch
from mlarch.errors import MlarchError, UsageError
from mlarch.evaluation.pipeline import EvalConfig
from mlarch.ingest.config import IngestConfig

NO_MODEL = "no-such-model-folder/x"  # validation refuses before the model is looked at


@pytest.fixture(scope="module")
def ids(llama_archive):
    """(archive, a run id, a module name) of the shared archive, read only."""
    archive = mlarch.open(llama_archive)
    run_id = archive.sql("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").item()
    module = archive.sql("SELECT module FROM modules ORDER BY module LIMIT 1").item()
    return archive, run_id, module


# (id, call(archive, run_id, module), a fragment of the message)
READ_CASES = [
    # k: a string is read as compare and sizes read it; None or a non-number is refused by name
    ("top_k k None", lambda a, r, m: a.top_k(r, m, None), "k must be a fraction in (0, 1), got None: e.g. k=0.01"),
    ("top_k k word", lambda a, r, m: a.top_k(r, m, "x"), "k must be a fraction in (0, 1), got 'x'"),
    ("selection k None", lambda a, r, m: a.selection("tiny-llama", "en", None, m), "got None: e.g. k=0.01"),
    ("selection k list", lambda a, r, m: a.selection("tiny-llama", "en", [0.01], m), "got [0.01]"),
    # seed: an integer, never a bool, a string or a list
    ("selection seed word", lambda a, r, m: a.selection("tiny-llama", "en", 0.01, m, seed="x"),
     "seed 'x' is not valid: seed= takes an integer from 0 to 2**63-1, e.g. seed=1"),
    ("selection seed list", lambda a, r, m: a.selection("tiny-llama", "en", 0.01, m, seed=[]), "seed [] is not valid"),
    ("selection seed bool", lambda a, r, m: a.selection("tiny-llama", "en", 0.01, m, seed=True),
     "seed True is not valid"),
    ("compare seed text", lambda a, r, m: a.compare("tiny", ["en", "de"], seed="1"), "seed '1' is not valid"),
    ("compare seed bool", lambda a, r, m: a.compare("tiny", ["en", "de"], seed=True), "seed True is not valid"),
    ("sizes seed word", lambda a, r, m: a.sizes("tiny", seed="x"), "seed 'x' is not valid"),
    ("sizes seed bool", lambda a, r, m: a.sizes("tiny", seed=True), "seed True is not valid"),
    # ids, model and module names that are not strings
    ("run int", lambda a, r, m: a.run(1), "run_id= takes a run id as a string, got 1: see Archive.runs()"),
    ("show float", lambda a, r, m: a.show(1.5), "run_id= takes a run id as a string, got 1.5"),
    ("norms list", lambda a, r, m: a.norms(["x"]), "run_id= takes a run id as a string, got ['x']"),
    ("levels run int", lambda a, r, m: a.levels(0, m), "run_id= takes a run id as a string, got 0"),
    ("levels module list", lambda a, r, m: a.levels(r, ["x"]), "module= takes a module name as a string"),
    ("magnitudes model int", lambda a, r, m: a.magnitudes(1, m), "model= takes a model name as a string, got 1"),
    ("magnitudes module dict", lambda a, r, m: a.magnitudes("tiny-llama", {}), "module= takes a module name"),
    ("selection lang int", lambda a, r, m: a.selection("tiny-llama", 0, 0.01, m), "lang= takes a language code"),
    ("runs model int", lambda a, r, m: a.runs(model=1), "model= takes a model name (or a part of one) as a string"),
    ("analyses model float", lambda a, r, m: a.analyses(model=1.5), "model= takes a model name"),
    ("evaluations model bool", lambda a, r, m: a.evaluations(model=True), "model= takes a model name"),
    ("evaluations eval_ids int", lambda a, r, m: a.evaluations(eval_ids=1), "eval_ids= takes an eval id or a list"),
    ("resolve_model int", lambda a, r, m: a.resolve_model(1), "model= takes a model name as a string, got 1"),
    ("verify int", lambda a, r, m: a.verify(1), "run_ids= takes a run id or a list of them, got 1"),
    ("verify empty list", lambda a, r, m: a.verify([]), "run_ids=[] names no run"),
    ("verify list of int", lambda a, r, m: a.verify([r, 2]), "run_ids= holds 2 at index 1, not a run id"),
    ("rm int", lambda a, r, m: a.rm(1, dry_run=True), "run_ids= takes a run id or a list of them, got 1"),
    ("analysis_of_runs None", lambda a, r, m: a.analysis_of_runs(None), "run_ids= takes run ids, got None"),
    # language lists: the bad item and its index are named
    ("compare langs None item", lambda a, r, m: a.compare("tiny", ["en", None]),
     "langs= holds None at index 1, not a language code (a string): e.g. langs=['en', 'de']"),
    ("compare langs int", lambda a, r, m: a.compare("tiny", 0), "langs= takes language codes"),
    ("compare langs bytes", lambda a, r, m: a.compare("tiny", b"en,de"), "langs= takes language codes"),
    ("chart langs int", lambda a, r, m: a.chart("overlap", model="tiny", langs=0), "langs= takes language codes"),
    ("chart k object", lambda a, r, m: a.chart("sizes", model="tiny", k=object()), "k= takes a number or a list"),
    ("analysis_overlap analyses int", lambda a, r, m: a.analysis_overlap("tiny", ["en"], analyses=1),
     "analyses= takes an analysis name or a list of them"),
    # SQL text and params
    ("sql int", lambda a, r, m: a.sql(123), "query= takes SQL as a string, got 123"),
    ("sql bytes", lambda a, r, m: a.sql(b"SELECT 1"), "got bytes b'SELECT 1': decode them first"),
    ("sql params int", lambda a, r, m: a.sql("SELECT 1", 0), "params= takes a dict (a value for each $name) or a list"),
    ("sql params str", lambda a, r, m: a.sql("SELECT 1", "x"), "params= takes a dict"),
    ("sql surrogate", lambda a, r, m: a.sql("SELECT '\udcff'"), "the SQL holds a lone surrogate"),
    ("sql fsdecode", lambda a, r, m: a.sql(os.fsdecode(b"SELECT '\xff'")), "the SQL holds a lone surrogate"),
    # a lone surrogate in an id or a name: refused, never a DuckDB InvalidInputException
    ("show surrogate", lambda a, r, m: a.show("\udcff"), "'\\udcff' holds a lone surrogate"),
    ("runs surrogate", lambda a, r, m: a.runs("\udcff"), "lone surrogate"),
    ("resolve_model surrogate", lambda a, r, m: a.resolve_model("tiny\udcff"), "lone surrogate"),
    ("top_k run surrogate", lambda a, r, m: a.top_k("\udcff", m, 0.01), "lone surrogate"),
    # paths
    ("export_bundle None", lambda a, r, m: a.export_bundle(None, model="tiny-llama"),
     "path= takes a .tar file, a str or pathlib.Path, got None"),
    ("export None", lambda a, r, m: a.export(None), "folder= takes a folder, a str or pathlib.Path, got None"),
    ("import_bundle int", lambda a, r, m: a.import_bundle(1), "path= takes a bundle"),
    ("report None", lambda a, r, m: a.report(None, "tiny"), "folder= takes a folder, a str or pathlib.Path, got None"),
    ("report NUL", lambda a, r, m: a.report("\x00", "tiny"), "folder='\\x00' holds a NUL character"),
    ("open int", lambda a, r, m: mlarch.open(1), "path= takes an archive folder or s3://BUCKET/PREFIX"),
    ("open bytes", lambda a, r, m: mlarch.open(b"x"), "path= takes an archive folder"),
    # empty ids and ids with control characters: shown as their repr, never raw
    ("verify empty id", lambda a, r, m: a.verify(""), "an empty string is not a run id: see Archive.runs()"),
    ("rm empty id", lambda a, r, m: a.rm("", dry_run=True), "an empty string is not a run id"),
    ("rm newline id", lambda a, r, m: a.rm("\n", dry_run=True), "no run '\\n' in "),
    ("verify newline id", lambda a, r, m: a.verify(["\n"]), "no run '\\n' in "),
    ("export_bundle escape id", lambda a, r, m: a.export_bundle("x.tar", "\x1b[31m"), "no run '\\x1b[31m' in "),
]


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "\r" not in text, repr(text)
    assert ": " in text, text  # <problem>: <fix>
    return text


@pytest.mark.parametrize("call, fragment", [case[1:] for case in READ_CASES], ids=[case[0] for case in READ_CASES])
def test_bad_types_raise_mlarch_errors(ids, call, fragment):
    archive, run_id, module = ids
    with pytest.raises(MlarchError) as caught:  # a raw TypeError, AttributeError, duckdb.Error fails here
        call(archive, run_id, module)
    assert fragment in one_line(caught.value)


def test_refusals_leave_the_archive_as_it_was(llama_archive, tmp_path):
    """The path checks come before any write, the sql ones before the catalog is opened."""
    before = sorted(p.name for p in llama_archive.iterdir())
    archive = mlarch.open(llama_archive)
    for call in (lambda: archive.rm(1, dry_run=True), lambda: archive.export(b"x"), lambda: archive.sql(0)):
        with pytest.raises(UsageError):
            call()
    assert sorted(p.name for p in llama_archive.iterdir()) == before


def test_k_as_text_is_read_as_compare_reads_it(ids):
    """A k of "0.01" is 0.01 in top_k and selection, as in compare and sizes."""
    archive, run_id, module = ids
    assert (archive.top_k(run_id, module, "0.05") == archive.top_k(run_id, module, 0.05)).all()
    assert (archive.selection("tiny-llama", "en", "0.05", module)
            == archive.selection("tiny-llama", "en", 0.05, module)).all()
    assert archive.compare("tiny", "en,de", k="0.05").equals(archive.compare("tiny", "en,de", k=0.05))
    # numpy integers are seeds too (a bool is not)
    np = pytest.importorskip("numpy")
    assert archive.sizes("tiny", seed=np.int64(1)).equals(archive.sizes("tiny", seed=1))


def test_unknown_printable_ids_keep_the_stores_message(ids):
    archive, _, _ = ids
    with pytest.raises(MlarchError, match="no run feedbeef in "):
        archive.verify("feedbeef")


# --- ingest and evaluate: their configs check types before any work -----------------------

# (id, options, a fragment of the message)
INGEST_CASES = [
    ("model None", {"model": None}, "model= takes a string (a model folder, .gguf file, hub id or named model), "
                                    "got None: e.g. model='qwen2.5-coder-0.5b'"),
    ("model int", {"model": 123}, "model= takes a string"),
    ("math None", {"math": None}, "math= takes a string (a named source such as mgsm"),
    ("control None", {"control": None}, "control= takes a string"),
    ("data_dir int", {"data_dir": 123}, "data_dir= takes a folder path (a str or pathlib.Path), got 123"),
    ("top_k text item", {"top_k": "0.01,x"}, "top-k value 'x' is not a number"),
    ("top_k object", {"top_k": object()}, "is not a number"),
    ("seeds word", {"seeds": "x"}, "seed 'x' is not valid: seeds= must be distinct integers"),
    ("seeds bool", {"seeds": True}, "seed True is not valid"),
    ("force text", {"force": "yes"}, "force= takes True or False, got 'yes'"),
    ("langs None item", {"langs": ["en", None]}, "langs= holds None at index 1"),
]


@pytest.mark.parametrize("options, fragment", [case[1:] for case in INGEST_CASES],
                         ids=[case[0] for case in INGEST_CASES])
def test_ingest_checks_types_before_any_work(tmp_path, options, fragment):
    assert fragment in refused_before_work(tmp_path, "ingest", ("model", "langs", "math", "control"),
                                           {"model": NO_MODEL, "langs": ["en"], "math": "mgsm", "control": "flores",
                                            **options})


def refused_before_work(tmp_path, method: str, positional: tuple, args: dict) -> str:
    """The one-line UsageError of Archive.<method> on a new path, which it must not create."""
    root = tmp_path / "new"
    with pytest.raises(UsageError) as caught:
        getattr(mlarch.open(root), method)(*[args.pop(name) for name in positional], **args)
    assert not root.exists()
    return one_line(caught.value)


def test_ingest_reads_one_value_or_a_comma_string_as_a_list():
    """top_k=0.01 is [0.01] and top_k="0.01,0.05" is read as the CLI reads --top-k (not
    character by character); seeds likewise."""
    def validated(**options):
        cfg = IngestConfig(model=NO_MODEL, langs=["en"], math="mgsm", control="flores", **options)
        cfg.validate()
        return cfg

    assert validated(top_k=0.01).top_k == [0.01]
    assert validated(top_k="0.01, 0.05").top_k == [0.01, 0.05]
    assert validated(seeds=1).seeds == [1]
    assert validated(seeds="1,101").seeds == [1, 101]
    with pytest.raises(UsageError, match=r"top-k value 0.0 is outside \(0, 1\)"):
        validated(top_k="0")  # one k, read as a number (it was the character '0' of an iterated string)


EVAL_CASES = [
    ("data None", {"data": None}, "data= takes a string (a named source such as mgsm"),
    ("interventions int", {"interventions": 5}, "interventions= takes a list of specs such as 'prune:en@0.01'"),
    ("interventions item int", {"interventions": [5]}, "intervention 5 is not text"),
    ("data_dir int", {"data_dir": 123}, "data_dir= takes a folder path"),
    ("model None", {"model": None}, "model= takes a string"),
    ("chat text", {"chat": "no"}, "chat= takes True or False, got 'no'"),
]


@pytest.mark.parametrize("options, fragment", [case[1:] for case in EVAL_CASES], ids=[case[0] for case in EVAL_CASES])
def test_evaluate_checks_types_before_any_work(tmp_path, options, fragment):
    assert fragment in refused_before_work(tmp_path, "evaluate", ("model", "langs", "task", "data"),
                                           {"model": NO_MODEL, "langs": ["en"], "task": "nll", "data": "mgsm",
                                            **options})


def test_evaluate_config_takes_one_intervention_as_a_list():
    cfg = EvalConfig(model=NO_MODEL, langs=["en"], task="nll", data="mgsm", interventions="prune:en@0.01")
    assert [p.label for p in cfg.validate()] == [p.label for p in EvalConfig(
        model=NO_MODEL, langs=["en"], task="nll", data="mgsm", interventions=["prune:en@0.01"]).validate()]
