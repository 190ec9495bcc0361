"""Archives as earlier mlarch releases wrote them, made from a current one (upgrade tests)."""

import duckdb
import zarr

from mlarch.store import arrays, catalog, records


def view_sql(version: int) -> list[str]:
    sql = dict((v, text) for v, _, text in catalog.migrations())[version]
    return [s.strip() for s in sql.split(";") if "CREATE VIEW" in s]


SCHEMA_5_VIEWS = ("language_unique_share", "set_totals", "language_unique", "overlap_global", "overlap_by_layer",
                  "overlap_by_module", "set_sizes", "layer_depth")  # created or re-created by 0005


def downgrade_to_schema_6(root):
    """The archive as the release before chunked content digests wrote it: every array's sha256
    over its whole bytes (recounted here from the stored arrays), no sha256_scheme column, and
    record digests sealed over those rows."""
    con = duckdb.connect(str(root / "catalog.duckdb"))
    for (path,) in con.execute("SELECT path FROM arrays").fetchall():
        data = zarr.open_array(store=str(root / "arrays.zarr"), path=path, mode="r")[...]
        con.execute("UPDATE arrays SET sha256 = ? WHERE path = ?", [arrays.whole(data), path])
    con.execute("ALTER TABLE arrays DROP COLUMN sha256_scheme")
    for (run_id,) in con.execute("SELECT run_id FROM runs WHERE status = 'FINISHED'").fetchall():
        con.execute("UPDATE runs SET record_sha256 = ? WHERE run_id = ?", [records.run_digest_in(con, run_id), run_id])
    for (model,) in con.execute("SELECT model FROM models").fetchall():
        con.execute("UPDATE models SET record_sha256 = ? WHERE model = ?", [records.model_digest_in(con, model), model])
    con.execute("DELETE FROM schema_migrations WHERE version > 6")
    con.close()


def downgrade_to_schema_5(root):
    """The archive as the release before arrays on S3 wrote it: no array_location table."""
    downgrade_to_schema_6(root)
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("DROP TABLE array_location")
    con.execute("DELETE FROM schema_migrations WHERE version > 5")
    con.close()


def downgrade_to_schema_4(root):
    """The archive as the release before relative depth and shares wrote it: the views of
    migration 0004 (no depth, share, set_totals or language_unique_share); same tables."""
    downgrade_to_schema_5(root)
    con = duckdb.connect(str(root / "catalog.duckdb"))
    for view in SCHEMA_5_VIEWS:
        con.execute(f"DROP VIEW {view}")
    recreated = [s for s in view_sql(4) if any(f"CREATE VIEW {v} " in s for v in SCHEMA_5_VIEWS)]
    for statement in recreated:
        con.execute(statement)
    con.execute("DELETE FROM schema_migrations WHERE version > 4")
    con.close()


def downgrade_to_schema_3(root):
    """The archive as the release before analyses wrote it: no analyses table or columns,
    record digests without the analysis."""
    downgrade_to_schema_4(root)
    con = duckdb.connect(str(root / "catalog.duckdb"))
    for view in ("language_unique", "overlap_global", "overlap_by_layer", "overlap_by_module", "lang_pairs",
                 "selection_langs", "set_sizes", "intervention_effects", "accuracy", "evaluations_current"):
        con.execute(f"DROP VIEW {view}")
    con.execute("DROP TABLE analyses")
    for table in ("selections", "patterns"):
        con.execute(f"CREATE TABLE {table}_old AS SELECT * EXCLUDE (analysis) FROM {table}")
        con.execute(f"DROP TABLE {table}")
        con.execute(f"ALTER TABLE {table}_old RENAME TO {table}")
    con.execute("ALTER TABLE runs DROP COLUMN analysis")
    con.execute("ALTER TABLE evaluations DROP COLUMN analysis")
    for version in (1, 3):
        for statement in view_sql(version):
            con.execute(statement)
    for (run_id,) in con.execute("SELECT run_id FROM runs WHERE status = 'FINISHED'").fetchall():
        con.execute("UPDATE runs SET record_sha256 = ? WHERE run_id = ?", [records.run_digest_in(con, run_id), run_id])
    for (eval_id,) in con.execute("SELECT eval_id FROM evaluations WHERE status = 'FINISHED'").fetchall():
        con.execute("UPDATE evaluations SET record_sha256 = ? WHERE eval_id = ?",
                    [records.evaluation_digest_in(con, eval_id), eval_id])
    con.execute("DELETE FROM schema_migrations WHERE version > 3")
    con.close()
