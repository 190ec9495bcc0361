"""`export-bundle --anonymize`: a bundle that says nothing of the machine it was made on.

Provenance records the host name, and absolute paths of the model folder, the data files and
the data folder (which name the user, e.g. /home/alice/...). Anonymizing drops them from the
bundle's rows: host names become a placeholder, every absolute path (also ~/..., ~alice/...,
C:\\..., \\\\server\\...) `<anonymized>/` plus its file name (a path template keeps its parts
from the `{lang}` one on), in provenance, in the model's source, in the runs' dataset and in
the analyses' sources alike, so the rows still agree with each other; user names and
passwords inside URLs (scheme://user:secret@host) become the placeholder too.

Kept, because a reader needs them to reproduce the numbers: Hugging Face Hub ids of models
and data sets (google/gemma-3-270m, hf:openai/gsm8k:test:main; a private repo's id is
kept too), named sources, relative paths as typed, the archive's model and analysis names
(chosen at ingest: --name), content digests (weights, data files, texts, arrays), library
versions, device and platform.

No digest in the bundle may confirm a guessed path or host name, so every digest that
covered one is derived again from the anonymized rows: the runs' configuration digests
(`config_digest_of`: from what the anonymized provenance says of the configuration, the
same for the same configuration, reproducible from the bundle), the analyses'
configuration digests, and the record digests of runs and models (records.RUN_FIELDS cover
provenance). The digests as sealed in the source archive are not recorded anywhere.

Only rows whose stored record digest verifies first are sealed again (an edited or damaged
record is refused, never laundered). Import checks the new digests as it checks any, so a
bundle edited after export is still refused. The manifest's "anonymized" entry and each
run's provenance say the bundle was anonymized, which kinds of values were replaced and
which digests were derived again.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket

from mlarch.errors import MlarchError
from mlarch.wording import Arg, error
from mlarch.store import analyses, layout, records

PLACEHOLDER = "<anonymized>"
# where a host name is recorded: the runs' host column and the provenance's "host"
HOST_KEYS = ("host",)
# a path as a whole value: POSIX absolute, home-relative (~/x, ~alice/x), Windows drive or UNC
_WHOLE_PATH = re.compile(r"^(?:/|~[\w.-]*[/\\]|[A-Za-z]:[\\/]|\\\\)")
# an absolute path inside a longer text (two components at least, not part of a URL or a
# relative path, nor what follows a placeholder): /home/alice/data/en.jsonl in "read /home/alice/data/en.jsonl"
_INNER_PATH = re.compile(r"(?<![\w.~:/\\<>-])(?:~[\w.-]*|[A-Za-z]:)?[/\\][^\s/\\'\"<>|,;]+(?:[/\\][^\s/\\'\"<>|,;]*)+")
# the user (and password) of a URL: https://alice:token@host/x -> https://<anonymized>@host/x
_URL_USER = re.compile(r"(?<=://)[^\s/@'\"<>]+@")
_MIN_HOST = 4  # shorter host names ("vm") are replaced where they are a whole value only


def anonymous_path(path: str) -> str:
    """`<anonymized>/<file name>`; a template keeps its parts from the one holding {lang} on
    (/home/alice/data/{lang}/math.jsonl -> <anonymized>/{lang}/math.jsonl)."""
    parts = [p for p in re.split(r"[/\\]+", path) if p and not re.fullmatch(r"[A-Za-z]:", p)]
    if parts and path.startswith("~"):  # ~ or ~alice: the home folder
        parts = parts[1:]
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
            out = _INNER_PATH.sub(lambda m: anonymous_path(m.group()), _URL_USER.sub(PLACEHOLDER + "@", value))
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
            raise error(MlarchError, f"run {run['run_id']}'s rows differ from its record digest, and ",
                        Arg("anonymize", True),
                        " seals them again: run `mlarch verify`, restore the run (or remove it), then export")
    by_path = {record["path"]: record for record in tables["arrays"]}
    for model in tables["models"]:
        magnitudes = by_path.get(layout.array_path(model["magnitudes_group"], "magnitudes"))
        actual = records.model_digest(model, [m for m in tables["modules"] if m["model"] == model["model"]],
                                      [magnitudes] if magnitudes else [])
        if actual != model.get("record_sha256"):
            raise error(MlarchError, f"model {model['model']!r}'s rows differ from its record digest, and ",
                        Arg("anonymize", True),
                        " seals them again: run `mlarch verify`, restore the model, then export")


# what the manifest and each run's provenance say was done (kinds of values, never the values)
REPLACED = ["host names (runs.host, provenance host)", "runs.pid",
            "absolute paths (model folder or file, data files, data folder), kept: the file name",
            "user names and passwords in URLs"]
KEPT = ["hub ids of models and data sets", "named sources", "relative paths as typed",
        "model and analysis names", "content digests (weights, data files, texts, arrays)",
        "library versions, device, platform"]
REDERIVED = ["runs.config_digest", "analyses.config_digest", "runs.record_sha256", "models.record_sha256"]


def config_digest_of(run: dict) -> str:
    """The configuration digest of an anonymized run: sha256 over what its row and its
    (anonymized) provenance say of the configuration. Runs of one configuration share it, as
    they shared the original (which hashed the original paths: it could confirm a guessed
    path, so it is not kept); anyone can derive it again from the bundle."""
    prov = run.get("provenance")
    prov = json.loads(prov) if isinstance(prov, str) else prov
    prov = prov if isinstance(prov, dict) else {}
    config, model, data = (prov.get(k) if isinstance(prov.get(k), dict) else {} for k in ("config", "model", "data"))
    identity = {
        "record": "mlarch-anonymized-config-1",
        **{key: run.get(key) for key in ("model", "lang", "role", "dataset", "seed", "n_samples", "k_values")},
        "source": model.get("source"), "revision": model.get("revision"), "commit_sha": model.get("commit_sha"),
        "weights_sha256": model.get("weights_sha256"), "dtype": model.get("dtype"),
        "data_files": data.get("files"), "method_record": prov.get("method"), "only_correct": prov.get("only_correct"),
        **{f"config.{key}": config.get(key) for key in (
            "samples", "max_length", "top_k", "gguf_file", "trust_remote_code", "method", "sampling", "shuffle_seed",
            "template", "paper_compat")},
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def anonymize(tables: dict[str, list[dict]]) -> dict:
    """Scrub the rows of `tables` in place (runs, models, analyses: host names, absolute
    paths), derive again each run's configuration digest and record digest, each model's
    record digest and each analysis's configuration digest; returns what the manifest
    records about it (kinds of values, never the values or the digests they replaced)."""
    check_seals(tables)
    scrub = Scrubber(_hosts(tables))
    by_owner: dict[str, list[dict]] = {}
    for record in tables["arrays"]:
        by_owner.setdefault(record["owner"], []).append(record)
    marker = {"by": "export-bundle --anonymize", "placeholder": PLACEHOLDER, "rederived": ["config_digest"]}
    for run in tables["runs"]:
        prov = run.get("provenance")
        prov = json.loads(prov) if isinstance(prov, str) else prov
        run["dataset"] = scrub.value(run.get("dataset"))
        for column in ("host", "pid"):  # not sealed: where a RUNNING run's process lived
            if column in run:
                run[column] = None
        if isinstance(prov, dict):
            prov = scrub.value(prov)
            prov["anonymized"] = dict(marker)
            run["provenance"] = prov
        run["config_digest"] = config_digest_of(run)
        if isinstance(prov, dict):
            if "config_digest" in prov:
                prov["config_digest"] = run["config_digest"]
            run["provenance"] = json.dumps(prov)
        samples = sorted((s for s in tables["run_samples"] if s["run_id"] == run["run_id"]), key=lambda s: s["position"])
        run["record_sha256"] = records.run_digest(run, [s["item_index"] for s in samples],
                                                  by_owner.get(run["run_id"], []))
    by_path = {record["path"]: record for record in tables["arrays"]}
    for model in tables["models"]:
        model["source"] = scrub.value(model.get("source"))
        magnitudes = by_path.get(layout.array_path(model["magnitudes_group"], "magnitudes"))
        model["record_sha256"] = records.model_digest(
            model, [m for m in tables["modules"] if m["model"] == model["model"]], [magnitudes] if magnitudes else [])
    for row in tables["analyses"]:
        config = scrub.value(json.loads(row["config"]))
        row["config"] = json.dumps(config)
        row["config_digest"] = analyses.config_digest(config)
    return {"by": "export-bundle --anonymize", "placeholder": PLACEHOLDER, "replaced": REPLACED, "kept": KEPT,
            "rederived": REDERIVED, "values_replaced": scrub.replaced}
