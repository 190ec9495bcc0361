"""Content-addressed records: a sha256 over the canonical form of a finished run (its catalog
row, provenance, drawn items and array digests) and of a model (its row, modules and
magnitudes array). Stored with the row at commit; `verify` and `import-bundle` recompute it.

It protects against damage and careless edits (a changed n_samples, a drawn item index,
swapped language labels): any edit of a covered field changes the digest. It does not stop
a forger, who can recompute the digest after editing (there is no secret key)."""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime
from decimal import Decimal

from mlarch.store.rows import dicts

RUN_FIELDS = ("run_id", "model", "lang", "role", "dataset", "seed", "n_samples", "n_tokens", "n_truncated",
              "k_values", "config_digest", "arrays_group", "started_at", "finished_at", "provenance")
MODEL_FIELDS = ("model", "source", "source_kind", "revision", "commit_sha", "weights_sha256", "dtype",
                "architecture", "n_modules", "n_scored_params", "magnitudes_group", "created_at")
MODULE_FIELDS = ("module", "layer", "kind", "n_rows", "n_cols", "n_params", "position", "param_offset",
                 "norm_offset")
EVAL_FIELDS = ("eval_id", "model", "weights_sha256", "math_run_id", "control_run_id", "task", "dataset", "role", "lang", "intervention", "target_lang", "k", "seed",
               "factor", "n_set", "n_params_changed", "n_items", "n_tokens", "value", "stderr", "created_at",
               "finished_at", "config_digest", "baseline_key", "provenance")
EVAL_ITEM_FIELDS = ("position", "item_index", "n_tokens", "nll", "prompt_sha256", "completion", "extracted",
                    "reference", "correct")
ARRAY_FIELDS = ("path", "owner", "kind", "dtype", "shape", "sha256", "nbytes", "meta_sha256", "chunk_sha256")


def _canonical(value):
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def _digest(kind: str, body: dict) -> str:
    text = json.dumps({"record": kind, **_canonical(body)}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _pick(row: dict, fields) -> dict:
    return {f: row.get(f) for f in fields}


def _array(row: dict) -> dict:
    body = _pick(row, ARRAY_FIELDS)
    if row.get("sha256_scheme") is not None:  # schema 7; absent, a digest sealed earlier still verifies
        body["sha256_scheme"] = row["sha256_scheme"]
    return body


def _arrays(rows) -> list[dict]:
    return sorted((_array(r) for r in rows), key=lambda r: r["path"])


def _parsed(text: str):
    """Provenance JSON as the digest reads it. Text that does not parse (an edit: mlarch writes
    JSON a few levels deep, never 100,000) is digested as it is, so its record fails to match
    (verify reports it) instead of the check itself failing."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return {"unparsed provenance": text}


def run_digest(run: dict, item_indices: list[int], array_rows) -> str:
    """Digest of a run from its `runs` row (dict), its drawn item indices in drawn order and
    its `arrays` rows. The provenance may be JSON text (as DuckDB returns it) or a dict."""
    body = _pick(run, RUN_FIELDS)
    if run.get("analysis") is not None:  # schema 4; absent, a digest sealed earlier still verifies
        body["analysis"] = run["analysis"]
    if isinstance(body["provenance"], str):
        body["provenance"] = _parsed(body["provenance"])
    body["samples"] = [int(i) for i in item_indices]
    body["arrays"] = _arrays(array_rows)
    return _digest("mlarch-run-1", body)


def model_digest(model: dict, module_rows, array_rows) -> str:
    """Digest of a model from its `models` row (dict), its `modules` rows and its magnitudes array row."""
    body = _pick(model, MODEL_FIELDS)
    body["modules"] = sorted((_pick(m, MODULE_FIELDS) for m in module_rows), key=lambda m: m["position"])
    body["arrays"] = _arrays(array_rows)
    return _digest("mlarch-model-1", body)


def evaluation_digest(row: dict, items) -> str:
    """Digest of a finished evaluation from its `evaluations` row and its item rows."""
    body = _pick(row, EVAL_FIELDS)
    if row.get("analysis") is not None:  # as for runs: only where set (interventions, schema 4)
        body["analysis"] = row["analysis"]
    if isinstance(body["provenance"], str):
        body["provenance"] = _parsed(body["provenance"])
    body["items"] = sorted((_pick(i, EVAL_ITEM_FIELDS) for i in items), key=lambda i: i["position"])
    return _digest("mlarch-evaluation-1", body)


def evaluation_digest_in(con, eval_id: str) -> str | None:
    """Digest of an evaluation as the catalog behind `con` holds it (None: no such evaluation)."""
    rows = dicts(con, "SELECT * FROM evaluations WHERE eval_id = ?", [eval_id])
    if not rows:
        return None
    return evaluation_digest(rows[0], dicts(con, "SELECT * FROM evaluation_items WHERE eval_id = ?", [eval_id]))


def run_digest_in(con, run_id: str) -> str | None:
    """Digest of a run as the catalog behind `con` holds it (None: no such run)."""
    runs = dicts(con, "SELECT * FROM runs WHERE run_id = ?", [run_id])
    if not runs:
        return None
    samples = [r[0] for r in con.execute(
        "SELECT item_index FROM run_samples WHERE run_id = ? ORDER BY position", [run_id]).fetchall()]
    return run_digest(runs[0], samples, dicts(con, "SELECT * FROM arrays WHERE owner = ?", [run_id]))


def model_digest_in(con, model: str) -> str | None:
    """Digest of a model as the catalog behind `con` holds it (None: no such model)."""
    rows = dicts(con, "SELECT * FROM models WHERE model = ?", [model])
    if not rows:
        return None
    # the |W| array by the path the row names: models sharing weights share one array (whose
    # owner is the model that archived it first); for an unshared one this is its own array
    return model_digest(rows[0], dicts(con, "SELECT * FROM modules WHERE model = ?", [model]),
                        dicts(con, "SELECT * FROM arrays WHERE path = ? AND kind = 'magnitudes'",
                              [f"{rows[0]['magnitudes_group']}/magnitudes"]))


def seal(con) -> None:
    """Store record digests for every finished run and every model that lacks one (rows
    archived before schema version 2), inside the caller's transaction."""
    for (run_id,) in con.execute(
            "SELECT run_id FROM runs WHERE status = 'FINISHED' AND record_sha256 IS NULL").fetchall():
        con.execute("UPDATE runs SET record_sha256 = ? WHERE run_id = ?", [run_digest_in(con, run_id), run_id])
    for (model,) in con.execute("SELECT model FROM models WHERE record_sha256 IS NULL").fetchall():
        con.execute("UPDATE models SET record_sha256 = ? WHERE model = ?", [model_digest_in(con, model), model])


def sealed_in(con, kind: str, name: str) -> bool:
    """Whether run (`kind` "run") or model ("model") `name` of the catalog behind `con` has a
    record digest that its rows, as they are now, still give."""
    table, key, digest = ("runs", "run_id", run_digest_in) if kind == "run" else ("models", "model", model_digest_in)
    stored = con.execute(f"SELECT record_sha256 FROM {table} WHERE {key} = ?", [name]).fetchall()
    return bool(stored) and stored[0][0] is not None and stored[0][0] == digest(con, name)
