"""Keeping an archive trustworthy: verify it, collect leftovers of interrupted ingests,
remove runs or models (and keep the derived tables true for what remains). Arrays are in
the archive's arrays.zarr or its S3 prefix (mlarch.store.array_store): the same checks for both."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from mlarch import methods
from mlarch.errors import MlarchError
from mlarch.wording import Phrase, error
from mlarch.store import analyses, array_store, arrays, catalog, layout, records as run_records
from mlarch.store.derive import current_runs, derive, replace_derived, run_ref, top_count
from mlarch.store.spans import read_spans


@dataclass
class Check:
    """One verify check: what was checked, on which object, whether it passed, and a detail."""
    check: str
    object: str
    ok: bool
    detail: str = ""


def _alive(host: str | None, pid: int | None) -> bool:
    """Whether a RUNNING run's process still runs (unknowable on another host: assume yes)."""
    if host != socket.gethostname():
        return True
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def verify(root: Path, run_ids: list[str] | None = None) -> list[Check]:
    """Digests, catalog-vs-array recounts and orphans. Every check is one row. Arrays are
    streamed chunk by chunk (memory bounded), wherever they are stored."""
    if (root / layout.CATALOG).exists():
        store = array_store.of(root)  # a remote one is probed: an unusable bucket is one error up front
    else:
        store = array_store.LocalArrays(root / layout.ARRAYS)  # the catalog read below names the problem
    checks: list[Check] = []
    if store.remote:
        checks.append(Check("array store", store.url, True, "reachable (the catalog's recorded location)"))
        mine, found = array_store.identity(root / layout.CATALOG), store.claimant()
        checks.append(Check("array store owner", store.url, found in (None, mine),
                            "this archive's" if found == mine else
                            f"not claimed yet (the next ingest, rm or gc writes {array_store.OWNER})" if found is None
                            else f"another archive's ({array_store.OWNER} names {found[:12]}, this archive is "
                                 f"{mine[:12]}): its runs are not orphans of this one; never run gc here"))
    with catalog.reading(root / layout.CATALOG) as con:
        runs = con.execute(
            "SELECT run_id, model, seed, status, arrays_group, host, pid, analysis FROM runs ORDER BY started_at"
        ).fetchall()
        known = {r[0] for r in runs}
        missing = [rid for rid in run_ids or [] if rid not in known]
        if missing:
            raise MlarchError(f"no run {', '.join(missing)} in {root} (see `mlarch runs`)")
        chosen = [r for r in runs if run_ids is None or r[0] in run_ids]
        models = {r[1] for r in chosen}
        owners = {r[0] for r in chosen if r[3] == "FINISHED"} | models
        records, bad_rows = [], []
        for row in catalog.dicts(con, f"SELECT owner, kind, {arrays.RECORD_COLUMNS} FROM arrays ORDER BY path"):
            try:  # a row naming a path other than its owner's is never read (nor fetched from a bucket)
                records.append((row["owner"], arrays.catalog_record(row)))
            except arrays.ArrayDamaged as exc:
                bad_rows.append((str(row["path"])[:120], str(exc)))
        model_groups = dict(con.execute("SELECT model, magnitudes_group FROM models").fetchall())
        # |W| is stored once per weights digest: each model's group holds one magnitudes array,
        # and the models sharing a group have the same weights and dtype
        magnitudes_problems = con.execute("""
            SELECT m.model, m.magnitudes_group, count(DISTINCT a.path) AS n_arrays,
                   count(DISTINCT o.weights_sha256 || '/' || o.dtype) AS n_weights
            FROM models m LEFT JOIN arrays a ON a.path = m.magnitudes_group || '/magnitudes' AND a.kind = 'magnitudes'
            LEFT JOIN models o ON o.magnitudes_group = m.magnitudes_group
            GROUP BY ALL HAVING n_arrays <> 1 OR n_weights <> 1 ORDER BY ALL""").fetchall()
        shared = dict(con.execute("SELECT magnitudes_group, count(*) FROM models GROUP BY ALL").fetchall())
        analysis_names = set(con.execute("SELECT model, analysis FROM analyses").fetchall())
        analysis_problems = analyses.problems(con) if run_ids is None else []
        # content digests of the records, recomputed from the rows as they are now
        run_seals = dict(con.execute("SELECT run_id, record_sha256 FROM runs").fetchall())
        model_seals = dict(con.execute("SELECT model, record_sha256 FROM models").fetchall())
        sealed = [("run", r[0], run_seals[r[0]], run_records.run_digest_in(con, r[0]))
                  for r in chosen if r[3] == "FINISHED"]
        sealed += [("model", model, model_seals[model], run_records.model_digest_in(con, model))
                   for model in sorted(models & set(model_groups))]
        evals = con.execute("SELECT eval_id, model, status, host, pid, record_sha256, n_items FROM evaluations "
                            "ORDER BY created_at, eval_id").fetchall() if run_ids is None else []
        item_counts = dict(con.execute("SELECT eval_id, count(*) FROM evaluation_items GROUP BY ALL").fetchall())
        known_evals = {e[0] for e in con.execute("SELECT eval_id FROM evaluations").fetchall()}
        orphan_evals = sorted(set(item_counts) - known_evals) if run_ids is None else []
        dangling = _dangling_rows(con) if run_ids is None else []
        sealed += [("evaluation", e[0], e[5], run_records.evaluation_digest_in(con, e[0]))
                   for e in evals if e[2] == "FINISHED"]
        n_params = dict(((m, mod), n) for m, mod, n in con.execute(
            "SELECT model, module, n_params FROM modules").fetchall())
        # runs whose set sizes are the authors' int(numel * k) (methods.authors_count), not top_count
        bf16_runs = {r[0] for r in con.execute(
            "SELECT run_id FROM runs WHERE json_extract_string(provenance, '$.method.name') = ?",
            [methods.BF16]).fetchall()}
        # the run each (model, lang, role, seed) uses: exactly one, the newest finished one
        in_use_problems = con.execute("""
            SELECT model, analysis, lang, role, seed,
                   count(*) FILTER (WHERE in_use AND status = 'FINISHED') AS n_in_use,
                   count(*) FILTER (WHERE in_use AND status <> 'FINISHED') AS n_unfinished,
                   max(finished_at) FILTER (WHERE status = 'FINISHED') AS newest,
                   max(finished_at) FILTER (WHERE in_use AND status = 'FINISHED') AS used
            FROM runs GROUP BY ALL
            HAVING n_unfinished > 0 OR (newest IS NOT NULL AND (n_in_use <> 1 OR used < newest))
            ORDER BY ALL""").fetchall()
        # derived rows of a (model, analysis, seed) with no finished run to derive them from
        stray = con.execute("""
            SELECT DISTINCT model, analysis, seed FROM (SELECT model, analysis, seed FROM selections UNION ALL
                                                        SELECT model, analysis, seed FROM patterns)
            EXCEPT SELECT model, analysis, seed FROM runs WHERE status = 'FINISHED' AND in_use ORDER BY ALL""").fetchall()
        drift = catalog.schema_drift(con)
        pairs = sorted({(r[1], r[7], r[2]) for r in chosen if r[3] == "FINISHED" and r[7] is not None})
        derived = {}
        for model, analysis, seed in pairs:
            try:
                current = current_runs(con, model, analysis, seed)
            except arrays.ArrayDamaged as exc:  # a levels row naming another path: reported below, never read
                current = exc
            spans = read_spans(con, model)
            stored_sel = con.execute(
                "SELECT model, analysis, k, seed, lang, module, n_math_top, n_control_top, n_selected, math_run_id, "
                "control_run_id FROM selections WHERE model = ? AND analysis = ? AND seed = ? ORDER BY ALL",
                [model, analysis, seed]).fetchall()
            stored_pat = con.execute(
                "SELECT model, analysis, k, seed, module, langs, n_params FROM patterns WHERE model = ? "
                "AND analysis = ? AND seed = ? ORDER BY ALL", [model, analysis, seed]).fetchall()
            derived[(model, analysis, seed)] = (current, spans, stored_sel, stored_pat)
    with_arrays = {owner for owner, _ in records}
    for run_id, model, seed, status, group, host, pid, analysis in chosen:
        if status == "FINISHED" and run_id not in with_arrays:
            checks.append(Check("run has arrays", run_id, False, "no arrays recorded: remove it with `mlarch rm`"))
        if status == "FINISHED" and (model, analysis) not in analysis_names:
            checks.append(Check("run in an analysis", run_id, False,
                                f"its analysis {analysis!r} is not in the analyses table: restore the catalog "
                                "from a copy"))
        elif status != "FINISHED" and not (status == "RUNNING" and _alive(host, pid)):
            checks.append(Check("no leftovers", run_id, False, f"{status} run of an interrupted ingest: run `mlarch gc`"))
    for eval_id in orphan_evals:
        checks.append(Check("no leftovers", f"evaluation items {eval_id}", False,
                            "item rows of no evaluation (removed while it ran): run `mlarch gc`"))
    for table, name in dangling:
        checks.append(Check("no leftovers", f"{table} {name}", False,
                            "rows of no run or model (removed while an ingest ran): run `mlarch gc`"))
    for eval_id, model, status, host, pid, _, n_items in evals:
        if status == "FINISHED" and item_counts.get(eval_id, 0) != n_items:
            checks.append(Check("evaluation items", eval_id, False,
                                f"{item_counts.get(eval_id, 0)} item rows for n_items = {n_items}: restore the "
                                "catalog from a copy, or remove the evaluation (`mlarch sql --write`) and rerun it"))
        elif status != "FINISHED" and not (status == "RUNNING" and _alive(host, pid)):
            checks.append(Check("no leftovers", f"evaluation {eval_id}", False,
                                f"{status} evaluation of an interrupted eval: run `mlarch gc`"))
    if run_ids is None:
        checks.append(Check("catalog schema", "tables and views", not drift,
                            "as the migrations made them" if not drift else
                            f"differs from mlarch's: {'; '.join(drift[:3])}"))
        for model, analysis, lang, role, seed, n_in_use, n_unfinished, *_ in in_use_problems:
            checks.append(Check("runs in use", f"{model} {analysis} {lang} {role} seed {seed}", False,
                                f"{n_in_use} finished run(s) in use, {n_unfinished} unfinished: exactly one, the newest "
                                "finished run, must be in use: remove the extra runs with `mlarch rm`"))
        for model, analysis, problem in analysis_problems:
            checks.append(Check("analysis record", f"{model} {analysis}", False,
                                f"{problem}: restore the catalog from a copy"))
        for model, analysis, seed in stray:
            checks.append(Check("derived rows", f"{model} {analysis} seed {seed}", False,
                                "selections/patterns rows with no finished run of that model, analysis and seed: "
                                "restore the catalog from a copy"))
        for model, group, n_arrays, n_weights in magnitudes_problems:
            checks.append(Check("shared magnitudes", model, False,
                                f"{group}: {n_arrays} magnitudes array row(s) for {shared.get(group, 0)} model(s), "
                                f"{n_weights} distinct weights: one |W| array per weights digest, used only by "
                                "models of those weights; restore the catalog from a copy"))
    for kind, name, stored, actual in sealed:
        ok = stored is not None and stored == actual
        checks.append(Check("record digest", f"{kind} {name}", ok, "" if ok else (
            "no record digest stored" if stored is None else
            f"the catalog row, provenance, samples or array records changed since the {kind} was archived "
            f"(sha256 {actual[:16]}..., recorded {stored[:16]}...)")))
    chosen_paths = {f"{group}/magnitudes" for model, group in model_groups.items() if model in models}
    checks += [Check("array digest", path, False, why) for path, why in bad_rows]
    for owner, record in records:
        if owner not in owners and record.path not in chosen_paths:  # a shared |W| keeps its first owner
            continue
        try:  # streamed (memory bounded); every chunk and the zarr.json checked on the way
            actual = arrays.check(store, record)
        except Exception as exc:  # missing node or chunk, edited metadata, failed checksum
            checks.append(Check("array digest", record.path, False, f"unreadable: {' '.join(str(exc).split())[:200]}"))
            continue
        ok = actual == record.sha256
        checks.append(Check("array digest", record.path, ok,
                            "" if ok else f"sha256 {actual[:16]}..., recorded {record.sha256[:16]}..."))
    for (model, analysis, seed), (current, spans, stored_sel, stored_pat) in derived.items():
        where = f"{model} {analysis} seed {seed}"
        try:
            if isinstance(current, Exception):
                raise current
            selections, patterns = derive(store, model, analysis, seed, spans, current, count_tops=True)
        except Exception as exc:
            checks.append(Check("set_sizes recount", where, False,
                                f"cannot recount: {' '.join(str(exc).split())[:160]}"))
            continue
        recount_sel = sorted(selections.rows())
        # (model, analysis, k, seed, lang, module, n_math_top, n_control_top, ...)
        def size(run_id: str, n: int, k: float) -> int:
            return methods.authors_count(n, k) if run_id in bf16_runs else top_count(n, k)

        wrong_size = [f"{r[4]} {r[5]} k={r[2]}" for r in recount_sel
                      if (r[6], r[7]) != (size(r[9], n_params[(model, r[5])], r[2]),
                                          size(r[10], n_params[(model, r[5])], r[2]))]
        checks.append(Check("top-k sizes", where, not wrong_size,
                            f"{len(recount_sel)} module sets of floor(numel * k) entries"
                            + (" (int(numel * k) for mathneuro-bf16 runs)" if bf16_runs & {r[9] for r in recount_sel} else "")
                            if not wrong_size else
                            f"stored level codes give a top-k set of the wrong size: {', '.join(wrong_size[:3])}"))
        recount_pat = sorted((m, a, k, s, mod, list(langs), n) for m, a, k, s, mod, langs, n in patterns.rows())
        checks.append(Check("set_sizes recount", where, recount_sel == sorted(stored_sel),
                            f"{len(recount_sel)} rows" if recount_sel == sorted(stored_sel)
                            else "stored counts differ from the popcounts of the stored masks"))
        same = recount_pat == sorted((m, a, k, s, mod, list(langs), n) for m, a, k, s, mod, langs, n in stored_pat)
        checks.append(Check("patterns recount", where, same,
                            f"{len(recount_pat)} rows" if same else "stored pattern counts differ from a recount"))
    if run_ids is None:
        live = {r[4] for r in runs if r[3] == "FINISHED" or (r[3] == "RUNNING" and _alive(r[5], r[6]))}
        for group in sorted(store.groups("runs") - live):
            checks.append(Check("no orphan arrays", group, False,
                                "no finished run owns it: " + _orphan_fix(store, group)))
        expected_models = set(model_groups.values()) | {layout.model_group(r[1]) for r in runs
                                                        if r[3] == "RUNNING" and _alive(r[5], r[6])}
        for group in sorted(store.groups("models") - expected_models):
            checks.append(Check("no orphan arrays", group, False,
                                "no archived model owns it: " + _orphan_fix(store, group)))
        for folder in leftover_staging(root):
            checks.append(Check("no leftovers", folder, False,
                                "staging folder of an interrupted import-bundle: run `mlarch gc`"))
        checks.append(Check("runs checked", str(len(chosen)), True, f"{len(records)} arrays recorded"))
    return checks


# Rows that name a run or model no longer there: an `arrays` row of a run (or a |W| row no
# model's group names), `run_samples` rows of a run. A run's rows go with it (rm, gc), so
# only a removal racing a commit or an edit leaves these; no check reads them otherwise.
_DANGLING = """
    SELECT 'arrays', path FROM arrays WHERE CASE WHEN kind = 'magnitudes'
        THEN path NOT IN (SELECT magnitudes_group || '/magnitudes' FROM models)
        ELSE owner NOT IN (SELECT run_id FROM runs) END
    UNION ALL
    SELECT DISTINCT 'run_samples', run_id FROM run_samples WHERE run_id NOT IN (SELECT run_id FROM runs)
    ORDER BY ALL"""


def _dangling_rows(con) -> list[tuple[str, str]]:
    """(table, array path or run id) of the rows _DANGLING finds."""
    return [(table, str(name)) for table, name in con.execute(_DANGLING).fetchall()]


def gc(root: Path) -> list[str]:
    """Remove leftovers of interrupted ingests and imports; returns what was removed."""
    removed: list[str] = []
    path = root / layout.CATALOG
    store = array_store.for_changes(root) if path.exists() else array_store.LocalArrays(root / layout.ARRAYS)
    with layout.commit_lock(root):
        with catalog.reading(path) as con:
            runs = con.execute("SELECT run_id, model, status, arrays_group, host, pid FROM runs").fetchall()
            model_groups = dict(con.execute("SELECT model, magnitudes_group FROM models").fetchall())
            owners = _magnitudes_owners(con)
            evals = con.execute("SELECT eval_id, model, status, host, pid FROM evaluations "
                                "WHERE status <> 'FINISHED'").fetchall()
            orphan_items = con.execute("SELECT count(*) FROM evaluation_items WHERE eval_id NOT IN "
                                       "(SELECT eval_id FROM evaluations)").fetchone()[0]
            dangling = _dangling_rows(con)
        dead_evals = [e for e in evals if e[2] != "RUNNING" or not _alive(e[3], e[4])]
        for r in runs:  # an edited row stops gc before anything is removed
            _owned_folder(store, "run", r[0], r[3])
        for name, group in model_groups.items():
            _owned_folder(store, "model", name, group, owners)
        dead = [r for r in runs if r[2] == "FAILED" or (r[2] == "RUNNING" and not _alive(r[4], r[5]))]
        dead_ids = {r[0] for r in dead}
        live_runs = [r for r in runs if r[0] not in dead_ids]
        keep_runs = {r[3] for r in live_runs}
        keep_models = set(model_groups.values()) | {layout.model_group(r[1]) for r in live_runs if r[2] == "RUNNING"}
        doomed, folders = [], []  # verify names the others (_orphan_fix)
        for group in sorted((store.groups("runs") - keep_runs) | (store.groups("models") - keep_models)):
            try:  # a link, or a name no mlarch makes (planted in a shared bucket): never removed through
                folders.append(_listed_folder(store, group))
                doomed.append(group)
            except MlarchError:
                pass
        staging = leftover_staging(root)
        if dead or dead_evals or orphan_items or dangling:
            with catalog.writing(path) as con:
                con.execute("DELETE FROM evaluation_items WHERE eval_id NOT IN (SELECT eval_id FROM evaluations)")
                for table, name in dangling:  # those found above: a commit under the lock adds none
                    con.execute("DELETE FROM arrays WHERE path = ?" if table == "arrays" else
                                "DELETE FROM run_samples WHERE run_id = ?", [name])
                for run_id, *_ in dead:
                    con.execute("DELETE FROM run_samples WHERE run_id = ?", [run_id])
                    con.execute("DELETE FROM arrays WHERE owner = ?", [run_id])
                    con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])
                for eval_id, *_ in dead_evals:
                    con.execute("DELETE FROM evaluation_items WHERE eval_id = ?", [eval_id])
                    con.execute("DELETE FROM evaluations WHERE eval_id = ?", [eval_id])
            removed += [f"run {r[0]} ({r[1]}, {r[2]})" for r in dead]
            removed += [f"evaluation {e[0]} ({e[1]}, {e[2]})" for e in dead_evals]
            removed += [f"{orphan_items} evaluation item row(s) of no evaluation"] if orphan_items else []
            removed += [f"{table} rows of {name} (no run or model)" for table, name in dangling]
        for group, folder in zip(doomed, folders):
            store.remove(folder)
            removed.append(f"arrays {group}")
        for name in staging:
            shutil.rmtree(root / name, ignore_errors=True)
            removed.append(f"staging folder {name} of an interrupted import-bundle")
    return removed


def rm(root: Path, run_ids: list[str] | None = None, model: str | None = None, *, dry_run: bool = False) -> list[str]:
    """Remove runs (or a whole model) and everything derived from them; derived tables are
    recomputed for what remains, promoting the newest earlier run where one was replaced.
    dry_run: change nothing and return what would be removed (rm_plan)."""
    path = root / layout.CATALOG
    store = (array_store.for_changes(root, claim=not dry_run) if path.exists()
             else array_store.LocalArrays(root / layout.ARRAYS))
    if dry_run:  # changes nothing: no lock to take (nor to wait for), on a read-only archive too
        layout.refuse_snapshot(root)
    with contextlib.nullcontext() if dry_run else layout.commit_lock(root):
        with catalog.reading(path) as con:
            runs = con.execute(
                "SELECT run_id, model, lang, role, seed, status, in_use, arrays_group, finished_at, analysis, host, "
                "pid FROM runs").fetchall()
            models = dict(con.execute("SELECT model, magnitudes_group FROM models").fetchall())
            owners = _magnitudes_owners(con)
            if model is not None:
                if model not in models:
                    raise MlarchError(f"no model {model!r} in the archive; archived: {', '.join(sorted(models)) or 'none'}")
                doomed = [r for r in runs if r[1] == model]
            else:
                unknown = [rid for rid in run_ids or [] if rid not in {r[0] for r in runs}]
                if unknown or not run_ids:
                    raise MlarchError(f"no run {', '.join(unknown) or '(none given)'} in {root} (see `mlarch runs`)")
                doomed = [r for r in runs if r[0] in run_ids]
            doomed_ids = {r[0] for r in doomed}
            _refuse_live([("run", r[0], r[10], r[11]) for r in doomed if r[5] == "RUNNING"] + (
                [("evaluation", *e) for e in con.execute(
                    "SELECT eval_id, host, pid FROM evaluations WHERE model = ? AND status = 'RUNNING'", [model]
                ).fetchall()] if model is not None else []))
            # every row's group is the one mlarch made before anything is removed (an edited
            # row must not point rm elsewhere); derive reads the others' arrays
            owned = {r[0]: _owned_folder(store, "run", r[0], r[7]) for r in runs}
            folders = [owned[r[0]] for r in doomed]
            # |W| shared with another model (same weights) stays, with its array row
            magnitudes_shared = model is not None and any(
                other != model and group == models[model] for other, group in models.items())
            if model is not None and not magnitudes_shared:
                folders.append(_owned_folder(store, "model", model, models[model], owners))
            if dry_run:  # the same selection as below, reported instead of removed
                return rm_plan(con, root, doomed, folders, model, store)
            refresh = {}
            for m, analysis, seed in sorted({(r[1], r[9], r[4]) for r in doomed if r[1] != model},
                                            key=lambda x: (x[0], str(x[1]), x[2])):
                current = {key: ref for key, ref in current_runs(con, m, analysis, seed).items()
                           if ref.run_id not in doomed_ids}
                promoted = []
                for lang, role in {(r[2], r[3]) for r in doomed if (r[1], r[9], r[4]) == (m, analysis, seed) and r[6]}:
                    earlier = [r for r in runs if (r[1], r[9], r[2], r[3], r[4]) == (m, analysis, lang, role, seed)
                               and r[5] == "FINISHED" and r[0] not in doomed_ids]
                    if earlier:
                        best = max(earlier, key=lambda r: r[8])
                        current[(lang, role)] = run_ref(con, best[0])  # with its levels record: reads are checked
                        promoted.append(best[0])
                refresh[(m, analysis, seed)] = (current, read_spans(con, m), promoted)
        # count_tops: sizes as stored (a mathneuro-bf16 run's are the authors' int(numel * k))
        derived = {key: derive(store, key[0], key[1], key[2], spans, current, count_tops=True)
                   for key, (current, spans, _) in refresh.items()}
        with catalog.writing(path) as con:
            for run_id in doomed_ids:
                con.execute("DELETE FROM run_samples WHERE run_id = ?", [run_id])
                con.execute("DELETE FROM arrays WHERE owner = ?", [run_id])
                con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])
            for (m, analysis, seed), (selections, patterns) in derived.items():
                for run_id in refresh[(m, analysis, seed)][2]:
                    con.execute("UPDATE runs SET in_use = true WHERE run_id = ?", [run_id])
                replace_derived(con, m, analysis, seed, selections, patterns)
            # an analysis left without runs goes (it would only be offered as a choice)
            con.execute("DELETE FROM analyses WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.model = analyses.model "
                        "AND r.analysis = analyses.analysis)")
            if model is not None:
                # evaluations measured those weights (and intervened on their sets): they go too
                con.execute("DELETE FROM evaluation_items WHERE eval_id IN "
                            "(SELECT eval_id FROM evaluations WHERE model = ?)", [model])
                for table in ("evaluations", "selections", "patterns", "modules", "models", "analyses"):
                    con.execute(f"DELETE FROM {table} WHERE model = ?", [model])
                if not magnitudes_shared:  # its own |W|, or the last user of a shared one
                    con.execute("DELETE FROM arrays WHERE path = ? AND kind = 'magnitudes'",
                                [f"{models[model]}/magnitudes"])
        # arrays go after the commit: a crash here leaves orphans for gc, never dangling rows
        for folder in folders:
            store.remove(folder)
    removed = [f"run {r[0]} ({r[1]} {r[2]} {r[3]} seed {r[4]})" for r in doomed]
    if model is not None:
        removed.append(f"model {model}")
    return removed


def _refuse_live(running: list[tuple]) -> None:
    """Refuse to remove a run or evaluation whose process still works on it (as gc spares
    them): its commit would otherwise archive rows for what rm removed."""
    live = [(kind, ident, host, pid) for kind, ident, host, pid in running if _alive(host, pid)]
    if live:
        kind, ident, host, pid = live[0]
        where = f"process {pid} on this machine" if host == socket.gethostname() else f"host {str(host)[:64]!r}"
        more = f" and {len(live) - 1} more" if len(live) > 1 else ""
        raise error(MlarchError, f"{kind} {ident} is RUNNING ({where}){more}: wait for it to finish, or stop it "
                    "and run ", Phrase("Archive.gc()", "`mlarch gc`"), "; nothing was removed")


def _magnitudes_owners(con) -> dict[str, str]:
    """path -> owner of every |W| array row (a shared one keeps the model that archived it)."""
    return dict(con.execute("SELECT path, owner FROM arrays WHERE kind = 'magnitudes'").fetchall())


def _owned_folder(store, kind: str, name: str, group, magnitudes_owners: dict | None = None):
    """The folder (S3: the prefix) of a run's arrays_group or a model's magnitudes_group, once
    the catalog row names exactly the group mlarch made for it (and no symbolic link leads
    elsewhere). A model sharing another's |W| names the group made for the array's owner."""
    try:
        expected = layout.run_arrays_group(name) if kind == "run" else layout.model_group(name)
        if kind == "model" and group != expected and isinstance(group, str):
            owner = (magnitudes_owners or {}).get(f"{group}/magnitudes")
            if isinstance(owner, str) and group == layout.model_group(owner):
                expected = group
        if group != expected:
            store.owned(group, expected)  # raises, naming both
    except layout.UnsafePath as exc:
        raise error(MlarchError, f"{kind} {name}: {exc}: the catalog row was edited; set it back (",
                    Phrase("Archive.sql(..., write=True)", "`mlarch sql --write`"),
                    ") or restore the catalog from a copy; nothing was removed") from None
    return _listed_folder(store, expected)


def _orphan_fix(store, group: str) -> str:
    """What to do about an array group no run or model owns: gc removes those mlarch could
    have made; a link or a name mlarch never makes (planted in a shared bucket) it leaves alone."""
    try:
        _listed_folder(store, group)
    except MlarchError:
        return "a link or a name mlarch never makes, which gc leaves alone: remove it by hand if it is not yours"
    return "run `mlarch gc`"


def _listed_folder(store, group: str):
    """The folder of a group found in arrays.zarr, unless it is (or lies behind) a symbolic
    link; on S3, the group's prefix once it is made of plain names."""
    try:
        return store.owned(group, group)
    except layout.UnsafePath as exc:
        raise MlarchError(f"{exc}: mlarch follows no link inside arrays.zarr (link arrays.zarr itself instead); "
                          "nothing was removed") from None


_LEGACY_STAGING_AGE_S = 3600  # staging of an older mlarch (random name, no owner); imports take seconds


def leftover_staging(root: Path) -> list[str]:
    """Names of `.import-*` staging folders in `root` whose import-bundle process is gone
    (killed, or its machine rebooted): `gc` removes them, `verify` reports them."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.name.startswith(layout.STAGING_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        owner = layout.staging_owner(entry.name)
        if owner is None:  # no owner in the name: judge by age
            try:
                if time.time() - entry.stat(follow_symlinks=False).st_mtime < _LEGACY_STAGING_AGE_S:
                    continue
            except OSError:  # gone meanwhile
                continue
        elif _alive(socket.gethostname() if owner[0] == layout.host_tag() else None, owner[1]):
            continue  # still importing, or on another host sharing this folder (unknowable)
        found.append(entry.name)
    return sorted(found)


def rm_plan(con, root: Path, doomed: list, folders: list, model: str | None, store=None) -> list[str]:
    """What rm would remove, one line each: runs, evaluations, analyses left without runs,
    array folders with their size on disk (S3: their objects' size), the model; then the total size."""
    store = store or array_store.LocalArrays(Path(root) / layout.ARRAYS)
    lines = [f"run {r[0]} ({r[1]} {r[2]} {r[3]} seed {r[4]})" for r in doomed]
    if model is not None:
        lines += [f"evaluation {e} ({task} {lang} {what})" for e, task, lang, what in con.execute(
            "SELECT eval_id, task, lang, CASE WHEN intervention = 'none' THEN 'baseline' ELSE intervention || ' ' || "
            "coalesce(target_lang, '') END FROM evaluations WHERE model = ? ORDER BY eval_id", [model]).fetchall()]
    doomed_ids = [r[0] for r in doomed]
    lines += [f"analysis {a} of {m}" for m, a in con.execute(
        "SELECT a.model, a.analysis FROM analyses a WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.model = a.model "
        "AND r.analysis = a.analysis AND NOT list_contains($ids, r.run_id))" + (" OR a.model = $m" if model else "") +
        " ORDER BY ALL", {"ids": doomed_ids, **({"m": model} if model else {})}).fetchall()]
    total = 0
    for folder in folders:
        size = store.size(folder)
        total += size
        lines.append(f"arrays {store.shown(folder, root)} ({size:,} bytes)")
    if model is not None:
        lines.append(f"model {model}")
    lines.append(f"{len(doomed)} run(s), {len(folders)} array folder(s), {total:,} bytes in all")
    return lines
