"""`mlarch chart` and `mlarch report`: paper-ready figures from an archive (offline)."""

from __future__ import annotations

import click


from mlarch.cli.common import archive_of as _archive
from mlarch.cli.common import csv_list as _csv


@click.command(epilog="""\b
Examples:
  mlarch chart overlap --model gemma --langs en,de,hi -o overlap.png
  mlarch chart sizes --model gemma -o sizes.pdf
  mlarch chart heatmap --model gemma --langs en,de,hi,zh --by layer --k 0.05 -o heatmap.svg
  mlarch chart upset --model llama --langs en,de,bn -o upset.html
  mlarch chart layers --model gemma --langs en,bn -o layers.json
  mlarch chart layers --model gemma,qwen --langs en,bn -o layers-2-models.svg
  mlarch chart overlap --model gemma,qwen --x depth -o overlap-depth.pdf
  mlarch chart unique --model gemma,qwen --langs en,de,bn -o unique.png
  mlarch chart overlap --model llama --analysis gsm8k-vs-mmlu -o overlap-mmlu.svg
  mlarch chart interventions --model gemma --task nll --intervention prune --k 0.01 -o effects.pdf
  mlarch chart interventions --model gemma --task accuracy --dataset mgsm --langs en,de,bn -o acc.png
  mlarch chart analyses --model gemma --by layer -o exact-vs-paper.svg
  mlarch chart analyses --model gemma --analysis gsm8k-vs-flores,gsm8k-vs-mmlu --k 0.01,0.05 -o controls.png

\b
The format follows the file's suffix: .svg .png (2x) .pdf .html (self-contained, works
offline) .json (the Vega-Lite spec). Several models matching --model (a substring, or a
comma list such as gemma,qwen) give one panel each; layers and overlap then put relative
depth layer / (blocks - 1) on the x axis, so models of different depth align (--x layer
for block indices).

\b
interventions draws the evaluations of `mlarch eval`: a heatmap of the relative change
of NLL or accuracy vs the baseline (rows: whose math-only set was changed, columns: the
evaluated language; random:<lang> rows: the random null) and the value vs k with each
language's own set changed (dashed: random null). --langs are the evaluated languages.""")
@click.argument("kind")
@click.option("--model", "model_pattern", required=True,
              help="Substring of archived model names (case-insensitive), or a comma list: gemma,qwen.")
@click.option("--langs", callback=_csv(str), default=None,
              help="Comma-separated languages in legend order [default: all archived for the model].")
@click.option("--k", "k_values", callback=_csv(float), default=None,
              help="Top-k fraction [default: 0.01 when archived]; sizes and heatmap --by global take a list "
                   "[default: every archived k].")
@click.option("--seed", type=int, default=None, help="Sampling seed [default: the smallest archived].")
@click.option("--by", type=click.Choice(["global", "layer"]), default="global", show_default=True,
              help="heatmap columns: k values (global) or layers at one k.")
@click.option("--task", default=None,
              help="interventions: nll or accuracy [default: nll when evaluated, else accuracy].")
@click.option("--intervention", default=None,
              help="interventions: prune, scale, fraction or random; a factor as in scale=0.5 "
                   "[default: prune when evaluated].")
@click.option("--dataset", default=None,
              help="interventions: evaluated data set, NAME or NAME:ROLE [default: the only one].")
@click.option("--analysis", default=None,
              help="Analysis of the model to draw [default: its only one]. See `mlarch analyses`.")
@click.option("--x", "x_axis", type=click.Choice(["layer", "depth"]), default=None,
              help="layers, overlap, heatmap --by layer: x axis, block index or relative depth layer / (blocks - 1) "
                   "[default: depth when several models match, else layer].")
@click.option("-o", "--output", required=True, help="Output file: .svg, .png, .pdf, .html or .json.")
@click.pass_context
def chart(ctx, kind, model_pattern, langs, k_values, seed, by, task, intervention, dataset, analysis, x_axis, output):
    """Draw one chart of KIND for the models matching --model and write it to a file.

    \b
    KIND is one of:
      sizes    math-specific parameter count vs top-k (log-log), one line per language
      overlap  Jaccard per layer, one line per language pair, chance level dashed
      heatmap  Jaccard per pair and k (--by global) or per pair and layer (--by layer)
      layers   math-specific parameter count per layer, one line per language
      upset    sizes of every intersection pattern of 3+ languages (UpSet plot)
      unique   language-unique share of each language's math-specific set, per model
      interventions
               evaluations of `mlarch eval`: relative change of NLL or accuracy
               per changed set and evaluated language, and the value vs k
      analyses Jaccard of one model's math-only sets in two analyses (--analysis A,B;
               default: the exact one and its --paper-compat twin X-paper): vs k,
               one line per language (--by global), or per layer, one line per k
    """
    from mlarch import charts

    charts.check_kind(kind)
    charts.check_format(output)
    figure = charts.build(_archive(ctx), kind, model=model_pattern, langs=langs, k=k_values, seed=seed, by=by,
                          task=task, intervention=intervention, dataset=dataset, x=x_axis,
                          **({"analysis": analysis} if analysis is not None else {}))
    path = charts.save(figure, output)
    click.echo(f"Wrote {path} ({kind})")


@click.command(epilog="""\b
Examples:
  mlarch report --model gemma -o supplement/
  mlarch report --model llama --langs en,de,bn --k 0.05 -o report-llama
  mlarch report --model llama --analysis gsm8k-vs-mmlu -o report-mmlu
  mlarch report --model gemma --anonymize -o supplement/   # no /home/NAME/... in it

\b
DIR gets <kind>.svg and <kind>.png for every chart (upset needs 3+ languages) and
index.html: the charts inline plus set sizes, global Jaccard per pair and k, and the
provenance of the runs used (self-contained, works offline). When the archive holds
finished evaluations with interventions (`mlarch eval`) for the model, it adds the
interventions chart(s) and a table of their effects vs the baselines. When the reported
analysis has a paper-compatible twin (X and X-paper, `ingest --paper-compat`), it adds the
analyses charts (Jaccard of the two analyses' sets per layer and vs k) and their table.""")
@click.option("--model", "model_pattern", required=True, help="Substring of archived model names (case-insensitive).")
@click.option("-o", "--output", "out_dir", required=True, help="Folder to write (created if missing).")
@click.option("--langs", callback=_csv(str), default=None, help="Languages [default: all archived for the model].")
@click.option("--k", type=float, default=None, help="k of the per-layer charts [default: 0.01 when archived].")
@click.option("--seed", type=int, default=None, help="Sampling seed [default: the smallest archived].")
@click.option("--analysis", default=None,
              help="Analysis of the model to report [default: its only one]. See `mlarch analyses`.")
@click.option("--anonymize", is_flag=True,
              help="Show every absolute path (data files, the archive; also another machine's, from an imported "
                   "bundle) as <anonymized>/NAME, as export-bundle --anonymize does.")
@click.pass_context
def report(ctx, model_pattern, out_dir, langs, k, seed, analysis, anonymize):
    """Write every chart (SVG and PNG) and an index.html with the key tables, for a
    paper's supplement."""
    index = _archive(ctx).report(out_dir, model_pattern, langs=langs, k=k, seed=seed, analysis=analysis,
                                 anonymize=anonymize)
    click.echo(f"Wrote {index}")
