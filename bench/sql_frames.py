"""Archive.sql frames: DuckDB's Arrow stream (now) vs building the frame from Python rows
(before), the same query in the same process, interleaved, medians.

A 1 M-row query (an integer, a double, a string and a boolean column) on a real archive's
catalog, through each frame builder on the read-only sandbox connection `Archive.sql`
uses, and through `Archive.sql` itself (sandbox, statement checks, frame). Also the CLI's
start-up: `mlarch sql "SELECT 1"` as a subprocess against `import duckdb, polars`, to show
the Arrow path adds no import (it goes through the Arrow C stream interface, not pyarrow).

    .venv/bin/python bench/sql_frames.py [--quick] [--rows N] [--repeats 3]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import Bench, interleave, median

QUERY = ("SELECT range AS i, range * 0.5 AS half, 'r' || range AS label, range % 7 = 0 AS sevens "
         "FROM range($n) ORDER BY i")


def main() -> None:
    bench = Bench("sql_frames", __doc__, repeats=3, quick_repeats=1, torch_threads=False, extra_args=lambda p: (
        p.add_argument("--rows", type=int, default=None, help="rows of the query (default 1000000, --quick 200000)"),
    ))
    import mlarch
    from mlarch.query.frames import arrow_frame
    from mlarch.store import catalog

    rows = bench.args.rows or (200_000 if bench.quick else 1_000_000)
    work = Path(tempfile.mkdtemp(prefix="bench-sql-frames-"))
    try:
        root = work / "archive"
        root.mkdir()
        catalog.ensure_schema(root / "catalog.duckdb")  # an empty archive: the query reads no table
        archive = mlarch.open(root)
        params = {"n": rows}

        def python_rows():
            with catalog.sandboxed(archive.catalog_path) as con:
                return catalog.frame(con, QUERY, params)

        def arrow():
            with catalog.sandboxed(archive.catalog_path) as con:
                return arrow_frame(con, QUERY, params)

        first, second = python_rows(), arrow()
        assert first.equals(second), "the two paths disagree"
        bench.log(f"{rows:,} rows: both paths give the same frame {second.shape}")
        times = interleave({"python rows": python_rows, "arrow": arrow,
                            "Archive.sql": lambda: archive.sql(QUERY, params)}, bench.repeats)
        bench.row(f"frame of {rows:,} rows: Arrow stream vs Python rows", median(times["arrow"]),
                  median(times["python rows"]), target="info", samples_ours=times["arrow"],
                  samples_baseline=times["python rows"])
        bench.row(f"Archive.sql, {rows:,} rows (sandbox + checks + Arrow)", median(times["Archive.sql"]),
                  median(times["python rows"]), target="< 2 s", passed=median(times["Archive.sql"]) < 2.0,
                  samples_ours=times["Archive.sql"], samples_baseline=times["python rows"])

        py = sys.executable
        env = {k: v for k, v in os.environ.items() if k != "MLARCH_ARCHIVE"}
        commands = {"import duckdb, polars": [py, "-c", "import duckdb, polars"],
                    "mlarch sql 'SELECT 1'": [py, "-m", "mlarch", "--archive", str(root), "sql", "SELECT 1"],
                    "pyarrow imported by mlarch sql": [py, "-c", (
                        "import sys; from mlarch.cli import main; sys.argv = ['mlarch', '--archive', "
                        f"{str(root)!r}, 'sql', 'SELECT 42 AS x']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
                        "assert 'pyarrow' not in sys.modules, 'pyarrow imported'")]}

        def call(argv):
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(done.stderr.strip()[-400:])

        for argv in commands.values():
            call(argv)
        cli = interleave({name: (lambda a=argv: call(a)) for name, argv in list(commands.items())[:2]},
                         max(bench.repeats, 5))
        base, ours = cli["import duckdb, polars"], cli["mlarch sql 'SELECT 1'"]
        bench.row("mlarch sql 'SELECT 1' / import duckdb+polars", median(ours), median(base),
                  ratio=median([a / b for a, b in zip(ours, base)]), target="<= 1.5x",
                  passed=median([a / b for a, b in zip(ours, base)]) <= 1.5)
        bench.finish(details={"rows": rows, "query": QUERY, "pyarrow_imported_by_cli": False})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
