"""`export-bundle --anonymize`: a bundle that says nothing of the machine it was made on.

Provenance records the host name, and absolute paths of the model folder, the data files and
the data folder (which name the user, e.g. /home/alice/...). Anonymizing drops them from the
bundle's rows: host names become a placeholder, every absolute path `<anonymized>/` plus its
file name (a path template keeps its parts from the `{lang}` one on), in provenance, in the
model's source, in the runs' dataset and in the analyses' sources alike, so the rows still
agree with each other.

The record digests cover provenance (records.RUN_FIELDS), so anonymized rows are sealed
again: only rows whose stored digest verifies first are re-sealed (an edited or damaged
record is refused, never laundered), and the manifest records the anonymization and each
record's digest as sealed in the source archive. Import checks the new digests as it checks
any, so a bundle edited after export is still refused; the configuration digests
(config_digest of runs, which covers the identity) stay as recorded: they are opaque hashes.
"""

from __future__ import annotations

import json
import re
import socket

from mlarch.errors import MlarchError
from mlarch.store import analyses, layout, records

PLACEHOLDER = "<anonymized>"
# where a host name is recorded: the runs' host column and the provenance's "host"
HOST_KEYS = ("host",)
# a path as a whole value: POSIX absolute, home-relative, Windows drive or UNC
_WHOLE_PATH = re.compile(r"^(?:/|~[/\\]|[A-Za-z]:[\\/]|\\\\)")
# an absolute path inside a longer text (two components at least, not part of a URL or a
# relative path, nor what follows a placeholder): /home/alice/data/en.jsonl in "read /home/alice/data/en.jsonl"
_INNER_PATH = re.compile(r"(?<![\w.~:/\\<>-])(?:~|[A-Za-z]:)?[/\\][^\s/\\'\"<>|,;]+(?:[/\\][^\s/\\'\"<>|,;]*)+")
_MIN_HOST = 4  # shorter host names ("vm") are replaced where they are a whole value only


def anonymous_path(path: str) -> str:
    """`<anonymized>/<file name>`; a template keeps its parts from the one holding {lang} on
    (/home/alice/data/{lang}/math.jsonl -> <anonymized>/{lang}/math.jsonl)."""
    parts = [p for p in re.split(r"[/\\]+", path) if p and p != "~" and not re.fullmatch(r"[A-Za-z]:", p)]
    if not parts:
        return PLACEHOLDER
    keep = next((i for i, p in enumerate(parts) if "{lang}" in p), len(parts) - 1)
    return "/".join([PLACEHOLDER, *parts[keep:]])


class Scrubber:
    """Replaces host names and absolute paths in any JSON-like value, keys included."""

    def __init__(self, hosts):
        self.hosts = sorted({h for h in hosts if isinstance(h, str) and h}, key=len, reverse=True)
        # inside a text, a host name as a whole word only (gpu-node-17 in "ran on gpu-node-17")
        inner = [rf"(?<![\w-]){re.escape(h)}(?![\w-])" for h in self.hosts if len(h) >= _MIN_HOST]
        self._inner_host = re.compile("|".join(inner)) if inner else None
        self.replaced = 0

    def text(self, value: str) -> str:
        """`value` with its host names and absolute paths replaced."""
        if value in self.hosts:
            out = PLACEHOLDER
        elif _WHOLE_PATH.match(value):
            out = anonymous_path(value)
        else:
            out = _INNER_PATH.sub(lambda m: anonymous_path(m.group()), value)
            if self._inner_host is not None:
                out = self._inner_host.sub(PLACEHOLDER, out)
        if out != value:
            self.replaced += 1
        return out

    def value(self, value):
        """A copy of a JSON-like value with every string (and dict key) scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            out = {}
            for key, inner in value.items():
                new = self.text(key) if isinstance(key, str) else key
                while new in out:  # two files of one name in different folders: keep both
                    new += "'"
                out[new] = PLACEHOLDER if key in HOST_KEYS and isinstance(inner, str) else self.value(inner)
            return out
        return value


def _hosts(tables: dict[str, list[dict]]) -> set[str]:
    found = {socket.gethostname()}
    for run in tables["runs"]:
        found.add(run.get("host"))
        prov = run.get("provenance")
        try:
            prov = json.loads(prov) if isinstance(prov, str) else prov
        except ValueError:
            prov = None
        if isinstance(prov, dict):
            found.add(prov.get("host"))
    return {h for h in found if isinstance(h, str) and h}


def check_seals(tables: dict[str, list[dict]]) -> None:
    """Refuse rows whose stored record digest does not verify: re-sealing them would vouch
    for an edit. `tables`: the exported rows as dicts with values as the catalog holds them."""
    by_owner: dict[str, list[dict]] = {}
    for record in tables["arrays"]:
        by_owner.setdefault(record["owner"], []).append(record)
    for run in tables["runs"]:
        samples = sorted((s for s in tables["run_samples"] if s["run_id"] == run["run_id"]), key=lambda s: s["position"])
        actual = records.run_digest(run, [s["item_index"] for s in samples], by_owner.get(run["run_id"], []))
        if actual != run.get("record_sha256"):
            raise MlarchError(f"run {run['run_id']}'s rows differ from its record digest, and --anonymize seals "
                              "them again: run `mlarch verify`, restore the run (or remove it), then export")
    by_path = {record["path"]: record for record in tables["arrays"]}
    for model in tables["models"]:
        magnitudes = by_path.get(layout.array_path(model["magnitudes_group"], "magnitudes"))
        actual = records.model_digest(model, [m for m in tables["modules"] if m["model"] == model["model"]],
                                      [magnitudes] if magnitudes else [])
        if actual != model.get("record_sha256"):
            raise MlarchError(f"model {model['model']!r}'s rows differ from its record digest, and --anonymize seals "
                              "them again: run `mlarch verify`, restore the model, then export")


def anonymize(tables: dict[str, list[dict]]) -> dict:
    """Scrub the rows of `tables` in place (runs, models, analyses: host names, absolute
    paths), re-seal each run's and model's record digest and each analysis's configuration
    digest; returns what the manifest records about it."""
    check_seals(tables)
    scrub = Scrubber(_hosts(tables))
    sealed_as = {"runs": {}, "models": {}}
    by_owner: dict[str, list[dict]] = {}
    for record in tables["arrays"]:
        by_owner.setdefault(record["owner"], []).append(record)
    for run in tables["runs"]:
        prov = run.get("provenance")
        prov = json.loads(prov) if isinstance(prov, str) else prov
        if isinstance(prov, dict):
            prov = scrub.value(prov)
            prov["anonymized"] = {"by": "export-bundle --anonymize", "placeholder": PLACEHOLDER}
            run["provenance"] = json.dumps(prov)
        run["dataset"] = scrub.value(run.get("dataset"))
        for column in ("host", "pid"):  # not sealed: where a RUNNING run's process lived
            if column in run:
                run[column] = None
        samples = sorted((s for s in tables["run_samples"] if s["run_id"] == run["run_id"]), key=lambda s: s["position"])
        sealed_as["runs"][run["run_id"]] = run["record_sha256"]
        run["record_sha256"] = records.run_digest(run, [s["item_index"] for s in samples],
                                                  by_owner.get(run["run_id"], []))
    by_path = {record["path"]: record for record in tables["arrays"]}
    for model in tables["models"]:
        model["source"] = scrub.value(model.get("source"))
        magnitudes = by_path.get(layout.array_path(model["magnitudes_group"], "magnitudes"))
        sealed_as["models"][model["model"]] = model["record_sha256"]
        model["record_sha256"] = records.model_digest(
            model, [m for m in tables["modules"] if m["model"] == model["model"]], [magnitudes] if magnitudes else [])
    for row in tables["analyses"]:
        config = scrub.value(json.loads(row["config"]))
        row["config"] = json.dumps(config)
        row["config_digest"] = analyses.config_digest(config)
    return {"placeholder": PLACEHOLDER, "dropped": ["host names (runs.host, provenance host)", "runs.pid",
                                                      "absolute paths (model source, data files and folder)"],
            "values_replaced": scrub.replaced, "sealed_as": sealed_as}
