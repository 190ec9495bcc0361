"""`mlarch eval` and `mlarch evals`: evaluations with and without interventions."""

from __future__ import annotations

import click

from mlarch.cli.common import archive_of as _archive
from mlarch.cli.common import archive_to_fill as _archive_to_fill
from mlarch.cli.common import csv_list as _csv
from mlarch.cli.output import emit, output_options
from mlarch.ingest.devices import HELP as _DEVICE_HELP
from mlarch.ingest.devices import option_callback as _device
from mlarch.ingest.devices import DEVICE_MAP_HELP as _DEVICE_MAP_HELP
from mlarch.ingest.devices import device_map_callback as _device_map


@click.command("eval", epilog="""\b
Examples:
  mlarch eval --model gemma-3-270m --langs en,de --task nll --data starter
  mlarch eval --model gemma-3-270m --langs en,de,fr,hi,bn,zh --task nll --data starter \\
      --intervene prune:en@0.01 --intervene random:en@0.01 --intervene scale:en@0.01:1.01
  mlarch eval --model ./llama --name llama-3.2-1b --langs en,de,hi --task accuracy --data gsm8k \\
      --data-dir ../shared/data --limit 200 --shots 8 --intervene prune:hi@0.01
  mlarch eval --model ./llama --langs en,de --task nll --data starter --analysis gsm8k-vs-mmlu \\
      --intervene prune:en@0.01
  mlarch sql "SELECT target_lang, lang, relative_change FROM intervention_effects WHERE k = 0.01"

\b
Interventions (repeatable; the baseline without one is always evaluated, or reused):
  prune:LANG@K        set LANG's math-only set at k to 0
  scale:LANG@K:F      multiply it by F (the paper: 1.01; not 0, which is prune)
  random:LANG@K       prune as many uniformly random entries per matrix (the null)
  fraction:LANG@K:F   prune a random fraction F of the set
The sets are read from the archive at --seed (any k: archived or re-thresholded); the
model must be the archived one (same weights). Each intervention is undone exactly
before the next, so a grid loads the model once.

\b
Items: the data's items in file order, minus those the archived run of the model drew
for that language, role and seed (held out) and minus the n-shot exemplars, then the
first --limit. --all-items evaluates every item, drawn or not. A --seed at which the model
has no run of a language, while runs at other seeds drew from the data, is refused (it
would hold out nothing).""")
@click.option("--model", "model_ref", required=True,
              help="Model folder, .gguf file, hub id, or named model (as for ingest).")
@click.option("--name", default=None, help="Model name in the archive [default: from --model].")
@click.option("--analysis", default=None,
              help="Analysis whose math-only sets the interventions change [default: the model's only one].")
@click.option("--langs", required=True, callback=_csv(str), help="Comma-separated languages to evaluate.")
@click.option("--task", type=click.Choice(["nll", "accuracy"]), required=True,
              help="nll: held-out negative log-likelihood per token; accuracy: greedy answers vs references.")
@click.option("--data", "data_spec", required=True,
              help="A named source (mgsm, gsm8k, flores, starter), a path template with {lang} or a hub data set "
                   "(hf:OWNER/NAME[@REVISION]:SPLIT[:CONFIG]), read as ingest reads it.")
@click.option("--role", type=click.Choice(["math", "control"]), default="math", show_default=True,
              help="Which texts of the data (and whose drawn items are held out).")
@click.option("--intervene", "interventions", multiple=True, metavar="SPEC",
              help="prune:LANG@K, scale:LANG@K:F, random:LANG@K or fraction:LANG@K:F (repeatable).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the archived sets and held-out items.")
@click.option("--limit", type=int, default=None, help="Evaluate the first N held-out items [default: all].")
@click.option("--all-items", is_flag=True, help="Evaluate every item of the data, drawn by ingest or not.")
@click.option("--shots", type=int, default=None, help="accuracy: exemplars in each prompt [default: 8].")
@click.option("--chat", is_flag=True, help="accuracy: build prompts with the tokenizer's chat template.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Read named sources' files from this folder (laid out like ../shared/data).")
@click.option("--device", default="auto", show_default=True, callback=_device, metavar="DEVICE",
              help=_DEVICE_HELP)
@click.option("--device-map", "device_map", default=None, callback=_device_map, metavar="auto", help=_DEVICE_MAP_HELP)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: float32 on CPU, bfloat16 on CUDA.")
@click.option("--batch-size", type=int, default=None,
              help="Items per pass [default: 1 (nll) or 8 (accuracy) on CPU, 16 on CUDA].")
@click.option("--max-length", type=int, default=512, show_default=True,
              help="nll: cut texts to this many tokens (as ingest); accuracy: longest prompt allowed.")
@click.option("--max-new-tokens", type=int, default=None,
              help="accuracy: tokens generated at most [default: 256].")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--gguf-file", "gguf_file", default=None, metavar="FILE",
              help="With a hub id (or a model folder): load this .gguf file of it, e.g. qwen2.5-0.5b-instruct-q4_k_m.gguf.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run Python code shipped with the model (its config's auto_map); off by default. Recorded in the provenance.")
@click.option("--force", is_flag=True, help="Rerun evaluations that are already archived.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.pass_context
def evaluate(ctx, model_ref, name, analysis, langs, task, data_spec, role, interventions, seed, limit, all_items, shots, chat,
             data_dir, device, device_map, dtype, batch_size, max_length, max_new_tokens, revision, gguf_file, trust_remote_code,
             force, quiet):
    """Evaluate a model per language, with and without interventions on its math-only sets."""
    from mlarch.cli.progress import RichReporter

    archive = _archive_to_fill(ctx)
    result = archive.evaluate(model_ref, langs, task, data_spec, interventions=list(interventions),
                              reporter=RichReporter(quiet=quiet, cli=True), name=name, analysis=analysis, role=role, seed=seed,
                              limit=limit, all_items=all_items, shots=shots, chat=chat, data_dir=data_dir,
                              device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                              max_new_tokens=max_new_tokens, revision=revision, gguf_file=gguf_file,
                              trust_remote_code=trust_remote_code, force=force, device_map=device_map)
    ids = result.written + result.reused
    click.echo(f"Archived {len(result.written)} evaluation(s) of {result.model}, reused {len(result.reused)}.")
    if ids:
        emit(archive.evaluations(eval_ids=ids), "table")


@click.command("evals", epilog="""\b
Examples:
  mlarch evals
  mlarch evals --model gemma --format csv
  mlarch sql "SELECT * FROM intervention_effects ORDER BY target_lang, lang\"""")
@click.option("--model", default=None, help="Only models whose name contains this (case-insensitive).")
@output_options
@click.pass_context
def evals(ctx, model, fmt):
    """List finished evaluations: task, data, language, intervention, value (newest per configuration)."""
    emit(_archive(ctx).evaluations(model), fmt)
