"""Issue 13: ingest and evaluate errors speak the caller's language. Through Archive.ingest /
Archive.evaluate a bad argument is named as Python names it (samples=, device='cuda:0'), never
as a flag; through `mlarch ingest` / `mlarch eval` the same check names the flag (--samples,
--device cuda:0), with the CLI's text unchanged. The store's errors too: a bad archive path or URL
names mlarch.open (--archive), arrays= (--arrays), analysis= (--analysis), anonymize=True
(--anonymize), Archive.sql(..., write=True) (`mlarch sql --write`). Plus a source check: no
`raise` in the layers under the API (store included) spells a flag outside mlarch.wording."""

import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlarch
from mlarch import methods
from mlarch.cli import cli
from mlarch.errors import MlarchError, UsageError

NO_MODEL = "no-such-model-folder/x"  # validation refuses before the model is looked at

# (API options, CLI args, a fragment of the Python message, a fragment of the CLI message)
INGEST_CASES = [
    ({"samples": 0}, ["--samples", "0"],
     "samples= must be positive, got 0: draw from 1 to 1,000,000 items per language and role, e.g. samples=500",
     "--samples must be positive, got 0: draw from 1 to 1,000,000 items per language and role, e.g. --samples 500"),
    ({"seeds": [1, 1]}, ["--seeds", "1,1"],
     "seeds repeat in 1,1: seeds= must be distinct integers from 0 to 2**63-1 (stored as BIGINT), "
     "e.g. seeds=[1, 101, 201]",
     "seeds repeat in 1,1: --seeds must be distinct integers from 0 to 2**63-1 (stored as BIGINT), "
     "e.g. --seeds 1,101,201"),
    ({"max_length": 0}, ["--max-length", "0"],
     "e.g. max_length=512, or max_length=None for no truncation",
     "e.g. --max-length 512, or --max-length none for no truncation"),
    ({"batch_size": 10**6}, ["--batch-size", "1000000"],
     "batch_size= must be at most 65,536, got 1,000,000: use from 1 to 65,536 samples per pass, e.g. batch_size=16",
     "--batch-size must be at most 65,536, got 1,000,000: use from 1 to 65,536 samples per pass, e.g. --batch-size 16"),
    ({"shuffle_seed": 1}, ["--shuffle-seed", "1"],
     "shuffle_seed= applies to sampling='pandas' only: drop it, or add sampling='pandas'",
     "--shuffle-seed applies to --sampling pandas only: drop it, or add --sampling pandas"),
    ({"sampling": "pandas"}, ["--sampling", "pandas"],
     "sampling='pandas' needs shuffle_seed=N (the authors': 1)",
     "--sampling pandas needs --shuffle-seed N (the authors': 1)"),
    ({"method": methods.BF16, "dtype": "float32"}, ["--method", methods.BF16, "--dtype", "float32"],
     "method='mathneuro-bf16' runs the model in bfloat16 as the authors did, not float32: pass dtype='bfloat16' "
     "(or leave dtype= out)",
     "--method mathneuro-bf16 runs the model in bfloat16 as the authors did, not float32: pass --dtype bfloat16 "
     "(or leave --dtype out)"),
    ({"device": "cuda:0", "device_map": "auto"}, ["--device", "cuda:0", "--device-map", "auto"],
     "device_map='auto' places every module itself: drop device='cuda:0' (or drop device_map= to use that one device)",
     "--device-map auto places every module itself: drop --device cuda:0 (or drop --device-map to use that one device)"),
    ({"device_map": "balanced"}, ["--device-map", "balanced"],
     "unknown device map 'balanced': use device_map='auto', or leave it out",
     "unknown device map 'balanced': use --device-map auto (device_map='auto'), or leave it out"),
    ({"name": " x"}, ["--name", " x"],
     "model name ' x' (name=) starts or ends with whitespace: pass name= with a short name such as 'llama-3-8b'",
     "model name ' x' (--name) starts or ends with whitespace: pass --name with a short name such as llama-3-8b"),
    ({"only_correct": ["e1", "e1"]}, ["--only-correct", "e1,e1"],
     "eval ids repeat in only_correct=: list each once", "eval ids repeat in --only-correct: list each once"),
    ({"ray_address": "h:1"}, ["--ray-address", "h:1"],
     "ray_address= applies to executor='ray' only: add executor='ray', or drop ray_address=",
     "--ray-address applies to --executor ray only: add --executor ray, or drop --ray-address"),
    ({"gpus_per_unit": 0}, ["--gpus-per-unit", "0"],
     "gpus_per_unit=0 is outside (0, 64]: pass the GPUs each worker holds, e.g. gpus_per_unit=1",
     "--gpus-per-unit 0.0 is outside (0, 64]: pass the GPUs each worker holds, e.g. --gpus-per-unit 1"),
    ({"arrays": "s3://Not_A_Bucket/p"}, ["--arrays", "s3://Not_A_Bucket/p"],
     "arrays='s3://Not_A_Bucket/p' is not s3://BUCKET/PREFIX: pass e.g. s3://my-bucket/mlarch",
     "--arrays 's3://Not_A_Bucket/p' is not s3://BUCKET/PREFIX: pass e.g. s3://my-bucket/mlarch"),
    ({"analysis": "a,b"}, ["--analysis", "a,b"],
     "analysis name 'a,b' contains control characters, commas or surrounding spaces: pass analysis= with a short name",
     "analysis name 'a,b' contains control characters, commas or surrounding spaces: pass --analysis with a short name"),
    ({"template": "x"}, None, "template='x' is not known: use one of default, paper", None),  # a click.Choice
    ({"top_k": []}, None, "no top-k values given: pass top_k=, e.g. top_k=[0.01]", None),
    ({"executor": "dask"}, None, "executor='dask' is not known", None),
]

EVAL_CASES = [
    ({"limit": 5, "all_items": True}, ["--limit", "5", "--all-items"],
     "limit= and all_items= exclude each other: pass one", "--limit and --all-items exclude each other: pass one"),
    ({"shots": -1}, ["--shots", "-1"],
     "shots= must be an integer from 0 to 64, got -1: e.g. shots=8",
     "--shots must be an integer from 0 to 64, got -1: e.g. --shots 8"),
    ({"chat": True}, ["--chat"],
     "chat= applies to task='accuracy' (NLL scores the texts as ingest builds them): drop chat=",
     "--chat applies to --task accuracy (NLL scores the texts as ingest builds them): drop --chat"),
    ({"max_new_tokens": 0}, ["--max-new-tokens", "0"],
     "max_new_tokens= must be positive, got 0: generate from 1 to 8,192 tokens, e.g. max_new_tokens=256",
     "--max-new-tokens must be positive, got 0: generate from 1 to 8,192 tokens, e.g. --max-new-tokens 256"),
    ({"seed": -1}, ["--seed", "-1"], "seed -1 is not valid: seed= takes an integer",
     "seed -1 is not valid: --seed takes an integer"),
    ({"role": "x"}, None, "unknown role 'x': choose role='math' or role='control'", None),
]


def error_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def check(call, args, python: str, flags: str | None, code: int = 2):
    """The API call raises naming arguments only; the CLI command prints the flag wording."""
    with pytest.raises(MlarchError) as caught:
        call()
    message = str(caught.value)
    assert python in message and "--" not in message, message
    assert caught.value.exit_code == code
    if args is not None:
        line = error_line(CliRunner().invoke(cli, args), code)
        assert flags in line and python not in line, line


@pytest.mark.parametrize("options,flags,python,cli_text", INGEST_CASES, ids=[str(c[0]) for c in INGEST_CASES])
def test_ingest_names_arguments_in_python_and_flags_in_the_cli(tmp_path, data, options, flags, python, cli_text):
    root = tmp_path / "arch"
    archive = mlarch.open(root)
    base = ["--archive", str(root), "ingest", "--model", NO_MODEL, "--langs", "en", "--math", data["math"],
            "--control", data["control"], "-q"]
    check(lambda: archive.ingest(NO_MODEL, ["en"], data["math"], data["control"], progress=False, **options),
          flags and base + flags, python, cli_text)
    assert not (root / "catalog.duckdb").exists()  # refused before anything was written


@pytest.mark.parametrize("options,flags,python,cli_text", EVAL_CASES, ids=[str(c[0]) for c in EVAL_CASES])
def test_evaluate_names_arguments_in_python_and_flags_in_the_cli(tmp_path, data, options, flags, python, cli_text):
    root = tmp_path / "arch"
    archive = mlarch.open(root)
    base = ["--archive", str(root), "eval", "--model", NO_MODEL, "--langs", "en", "--task", "nll",
            "--data", data["math"], "-q"]
    check(lambda: archive.evaluate(NO_MODEL, ["en"], "nll", data["math"], progress=False, **options),
          flags and base + flags, python, cli_text)


def test_loading_errors_name_arguments(tmp_path, data, model_dir):
    """Checks past validation (the model reference, the device) word their fix the same way."""
    root = tmp_path / "arch"
    archive = mlarch.open(root)
    model = str(model_dir["llama"])
    base = ["--archive", str(root), "ingest", "--langs", "en", "--math", data["math"], "--control", data["control"],
            "-q", "--model", model]
    check(lambda: archive.ingest(model, ["en"], data["math"], data["control"], gguf_file="w.bin", progress=False),
          base + ["--gguf-file", "w.bin"],
          "gguf_file='w.bin' is not a .gguf file inside the repository: pass its path there, "
          "e.g. gguf_file='qwen2.5-0.5b-instruct-q4_k_m.gguf'",
          "--gguf-file 'w.bin' is not a .gguf file inside the repository: pass its path there, "
          "e.g. --gguf-file qwen2.5-0.5b-instruct-q4_k_m.gguf")
    check(lambda: archive.ingest(model, ["en"], data["math"], data["control"], gguf_file="w.gguf", progress=False),
          base + ["--gguf-file", "w.gguf"],
          f"gguf_file='w.gguf' is not in the model folder {model}: pass a .gguf file that the folder holds, "
          "or the .gguf file itself as model=",
          f"--gguf-file w.gguf is not in the model folder {model}: pass a .gguf file that the folder holds, "
          "or the .gguf file itself as --model", code=1)
    import torch

    if not torch.cuda.is_available():
        check(lambda: archive.ingest(model, ["en"], data["math"], data["control"], device="cuda:0", progress=False),
              base + ["--device", "cuda:0"],
              "device='cuda:0' was asked for but no CUDA device is available: use device='cpu' or 'auto'",
              "--device cuda:0 was asked for but no CUDA device is available: use --device cpu or auto", code=1)
    assert not (root / "catalog.duckdb").exists()


def test_phrases_shown_values_and_on_off_flags():
    from mlarch.wording import Arg, Phrase, error, for_cli

    exc = error(MlarchError, "pass ", Arg("force", True), ", ", Arg("template", shown=repr("x")), ", ",
                Arg("data_dir", shown="DIR"), " or ", Phrase("max_length=None", "--max-length none"), "; see ",
                Phrase("Archive.verify()", "`mlarch verify`"))
    assert str(exc) == "pass force=True, template='x', data_dir=DIR or max_length=None; see Archive.verify()"
    assert for_cli(exc) == "pass --force, --template 'x', --data-dir DIR or --max-length none; see `mlarch verify`"
    assert exc.exit_code == 1


def test_rethreshold_and_method_errors_name_arguments():
    with pytest.raises(UsageError) as caught:
        methods.check_rethreshold("r1", methods.BF16, 0.02, [0.01])
    assert "run r1 used method='mathneuro-bf16'," in str(caught.value)
    assert str(caught.value).endswith("or ingest again with top_k= including 0.02")
    assert caught.value.cli_message.endswith("or ingest again with --top-k including 0.02")
    with pytest.raises(UsageError, match=r"^method='x' is not known: use one of mathneuro, mathneuro-bf16$"):
        methods.check_method("x")


# --- the store: archive paths, published URLs, analyses -------------------------------------

OPEN_CASES = [  # (what mlarch.open gets, a fragment of the Python message, of the CLI message, exit code)
    ("s3://Not_A_Bucket/p", "path='s3://Not_A_Bucket/p' is not s3://BUCKET/PREFIX",
     "--archive 's3://Not_A_Bucket/p' is not s3://BUCKET/PREFIX", 2),
    ("gs://bucket/archive", "(opened by mlarch.open); pass mlarch.open(DIR) or mlarch.open('s3://BUCKET/PREFIX')",
     "(opened by mlarch.open / --archive); pass --archive DIR or --archive s3://BUCKET/PREFIX", 2),
    ("missing", "no mlarch archive at missing: check the folder given to mlarch.open (or MLARCH_ARCHIVE); "
     "Archive.ingest or Archive.import_bundle creates one",
     "no mlarch archive at missing: check --archive (or MLARCH_ARCHIVE); `mlarch ingest` or `mlarch import-bundle` "
     "creates one", 1),
]


@pytest.mark.parametrize("path,python,cli_text,code", OPEN_CASES, ids=[c[0] for c in OPEN_CASES])
def test_a_bad_archive_names_mlarch_open_in_python_and_the_flag_in_the_cli(tmp_path, monkeypatch, path, python,
                                                                           cli_text, code):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    check(lambda: mlarch.open(path).runs(), ["--archive", path, "runs"], python, cli_text, code)
    assert list(tmp_path.iterdir()) == []  # nothing created, not even the cache


def test_a_foreign_catalog_names_mlarch_open(tmp_path):
    import duckdb

    con = duckdb.connect(str(tmp_path / "catalog.duckdb"))
    con.execute("CREATE TABLE invoices (id INTEGER)")
    con.close()
    check(lambda: mlarch.open(tmp_path).runs(), ["--archive", str(tmp_path), "runs"],
          "): point mlarch.open(DIR) at an mlarch archive folder", "): point --archive at an mlarch archive folder", 1)


@pytest.fixture(scope="module")
def two_analyses(tmp_path_factory, model_dir, data):
    """tiny-llama (en, de) in two analyses: data's control, then its math texts as a second control."""
    root = tmp_path_factory.mktemp("two") / "arch"
    archive = mlarch.open(root)
    for control in (data["control"], data["math"]):
        archive.ingest(str(model_dir["llama"]), ["en", "de"], data["math"], control, samples=3, top_k=[0.25],
                       device="cpu", progress=False)
    return root


def test_an_ambiguous_analysis_names_analysis_in_python_and_the_flag_in_the_cli(two_analyses):
    archive = mlarch.open(two_analyses)
    module = "model.layers.0.mlp.up_proj"
    python = "has 2 analyses (math-vs-control, math-vs-math): pass analysis=NAME to choose one"
    cli_text = "pass --analysis NAME (analysis= in the Python API) to choose one"
    base = ["--archive", str(two_analyses)]
    check(lambda: archive.compare("tiny-llama", ["en", "de"]),
          base + ["compare", "--model", "tiny-llama", "--langs", "en,de"], python, cli_text)
    check(lambda: archive.selection("tiny-llama", "en", 0.25, module), None, python, None)


def test_another_configuration_under_a_taken_name_names_analysis(two_analyses, model_dir, data):
    archive = mlarch.open(two_analyses)
    model = str(model_dir["llama"])
    # the taken name with the other analysis's control: refused before anything is scored
    check(lambda: archive.ingest(model, ["en", "de"], data["math"], data["math"], samples=3, top_k=[0.25],
                                 device="cpu", analysis="math-vs-control", progress=False),
          ["--archive", str(two_analyses), "ingest", "--model", model, "--langs", "en,de", "--math",
           data["math"], "--control", data["control"], "--samples", "3", "--top-k", "0.25", "--device", "cpu",
           "--analysis", "math-vs-math", "-q"],
          "pass analysis=NAME to archive this one as a separate analysis (see Archive.analyses())",
          "pass --analysis NAME to archive this one as a separate analysis (see `mlarch analyses`)")


def _edited_copy(source, target, statement: str) -> str:
    """A copy of the archive at `source` with one catalog row edited by hand; the edited run's id."""
    import shutil

    import duckdb

    shutil.copytree(source, target)
    con = duckdb.connect(str(target / "catalog.duckdb"))
    run_id = con.execute("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").fetchone()[0]
    con.execute(statement, [run_id])
    con.close()
    return run_id


def test_an_edited_row_names_anonymize_and_sql_write(two_analyses, tmp_path):
    """Export refuses rows edited by hand; the fix names anonymize=True / Archive.sql(..., write=True)
    in Python, --anonymize / `mlarch sql --write` in the CLI (also through the wrapping export error)."""
    sealed = tmp_path / "sealed"
    run_id = _edited_copy(two_analyses, sealed, "UPDATE runs SET provenance = json_merge_patch(provenance, "
                          "'{\"seed\": 7}') WHERE run_id = ?")
    out = tmp_path / "b.tar"
    check(lambda: mlarch.open(sealed).export_bundle(out, model="tiny-llama", anonymize=True),
          ["--archive", str(sealed), "export-bundle", "--model", "tiny-llama", "--anonymize", "-o", str(out)],
          f"run {run_id}'s rows differ from its record digest, and anonymize=True seals them again",
          f"run {run_id}'s rows differ from its record digest, and --anonymize seals them again", code=1)
    moved = tmp_path / "moved"
    _edited_copy(two_analyses, moved, "UPDATE arrays SET path = '/elsewhere' WHERE path = (SELECT min(path) FROM "
                 "arrays WHERE kind = 'levels') AND ? IS NOT NULL")
    check(lambda: mlarch.open(moved).export_bundle(out, model="tiny-llama"),
          ["--archive", str(moved), "export-bundle", "--model", "tiny-llama", "-o", str(out)],
          "set the row back (Archive.sql(..., write=True)) or restore the catalog from a copy; nothing was exported",
          "set the row back (`mlarch sql --write`) or restore the catalog from a copy; nothing was exported", code=1)
    assert not list(tmp_path.glob("b.tar*"))


# --- no flag spelt in a raise under the API ---------------------------------------------------

LIBRARY = Path(mlarch.__file__).parent
CHECKED = [LIBRARY / "methods.py", LIBRARY / "archive.py", *sorted((LIBRARY / "ingest").glob("*.py")),
           *sorted((LIBRARY / "evaluation").glob("*.py")), *sorted((LIBRARY / "store").glob("*.py"))]
FLAG = re.compile(r"(^|[\s(`'\"])--[a-z]")
SHELL_COMMANDS = ("pip install", "ray start")  # other programs' flags, the same from Python


def flags_in_raises(source: str) -> list[str]:
    """Text of string constants inside `raise` statements that spell a CLI flag, outside the
    CLI half of a Phrase (mlarch.wording) and other programs' flags (SHELL_COMMANDS)."""
    found = []

    def visit(node):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Phrase":
            visit(node.args[0]) if node.args else None  # the Python half must not name a flag either
            return
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if FLAG.search(node.value) and not any(shell in node.value for shell in SHELL_COMMANDS):
                found.append(node.value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            visit(node.exc)
    # message parts kept in module constants and used in raises (_FIX, seeds_fix, ...)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and "FIX" in t.id.upper() for t in node.targets):
            visit(node.value)
    return found


def test_no_raise_under_the_api_spells_a_flag():
    offenders = {path.name: hits for path in CHECKED if (hits := flags_in_raises(path.read_text()))}
    assert offenders == {}


def test_the_flag_check_finds_a_flag():
    bad = 'def f():\n    raise UsageError("--limit must be positive")\nFIX = "pass --name"\n'
    good = 'def f():\n    raise error(UsageError, Phrase("x=", "--x"), " pip install --no-deps y")\n'
    assert flags_in_raises(bad) == ["--limit must be positive", "pass --name"]
    assert flags_in_raises(good) == []
