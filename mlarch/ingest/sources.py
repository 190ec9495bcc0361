"""Data sources: where a language's math or control texts come from.

A source turns a language code into a list of texts in file order (item i of the
list is item_index i in `run_samples`). Three kinds exist:

* a path template containing ``{lang}`` (JSONL, CSV with a header, or plain text:
  mlarch.ingest.datafiles, which also says how records become texts);
* a named source (public corpora and the starter set: mlarch.ingest.corpora);
* a Hugging Face Hub data set, ``hf:OWNER/NAME[@REVISION]:SPLIT[:CONFIG]``, pinned to the
  commit it resolved to (mlarch.ingest.hub_data).

`resolve` picks one; the names below are re-exported from datafiles for callers that read
files directly.
"""

from __future__ import annotations

from pathlib import Path

from mlarch.errors import UsageError
from mlarch.wording import Arg, error
from mlarch.ingest import corpora, hub_data
from mlarch.ingest.datafiles import (INSTRUCT_TEMPLATE, QA_COLUMN_TEMPLATE, QA_TEMPLATE, TEXT_TEMPLATE,  # noqa: F401
                                     TEXT_TEMPLATES, DataSource, LoadedItems, TemplateFileSource, instruct_text,
                                     parse_file, parse_records, sha256_file)

# Named public corpora: name -> factory(data_dir) -> DataSource (registered in corpora.py).
NAMED_SOURCES = corpora.NAMED_SOURCES


def resolve(spec: str, data_dir: Path | None = None, template: str = "default") -> DataSource:
    """A named source, a hub data set (hf:...), or a path template containing {lang};
    `template` 'paper' (the authors' texts) applies to files and hub data sets: a named
    source has its own template."""
    if spec in NAMED_SOURCES:
        if template != "default":
            raise error(
                UsageError, Arg("template", template), f" applies to data files; the named source {spec!r} has its "
                "own template: pass the authors' files as a path template such as data/{lang}.csv"
            )
        return NAMED_SOURCES[spec](data_dir)
    if spec.startswith(hub_data.PREFIX):
        return hub_data.HubDataSource(spec, template)
    if "{lang}" in spec:
        return TemplateFileSource(spec, template)
    known = ", ".join(sorted(NAMED_SOURCES)) or "none yet"
    raise UsageError(
        f"data source {spec!r} is neither a named source (known: {known}), a hub data set "
        f"({hub_data.SYNTAX}) nor a path template containing {{lang}}, e.g. data/{{lang}}.jsonl"
    )
