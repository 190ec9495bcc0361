"""A Ray worker's manifest, checked as untrusted input before the driver commits it.

A worker (another process, possibly another machine with another mlarch) returns a small
manifest of the run it scored: ids, the sample indices, the records of the arrays it wrote.
The driver commits nothing it did not ask for: the manifest must be of the run id and unit
the driver sent (a copy of another unit's manifest, a duplicate, is refused), name exactly
that run's two arrays (no path elsewhere in the store, none outside it), with the shape and
dtype the model's layout gives, the sample indices the driver draws itself, and digests that
the arrays actually stored have (recounted from the store, chunk by chunk).
"""

from __future__ import annotations

import numpy as np

from mlarch.errors import MlarchError
from mlarch.ingest.context import WorkOrder
from mlarch.ingest.planning import Unit
from mlarch.ingest.units import Pending, draw_indices
from mlarch.store import arrays, layout
from mlarch.store import spans as span_layout
from mlarch.store.arrays import ArrayRecord
from mlarch.store.derive import levels_path, norms_path


class ManifestRefused(MlarchError):
    """A worker's manifest does not describe the run the driver asked for, as stored."""


_FIX = ("nothing of it is committed: check that every Ray worker runs this mlarch version on the same array store, "
        "then rerun the command (`mlarch gc` removes the run and its arrays)")


def _refuse(what: str, problem: str) -> None:
    raise ManifestRefused(f"a Ray worker's manifest for {what} {problem}: {_FIX}")


def _check_record(order: WorkOrder, what: str, kind: str, record, path: str, shape: tuple, dtype) -> None:
    """`record` is an ArrayRecord of exactly `path`, `shape` and `dtype` whose digests the stored array has."""
    if not isinstance(record, ArrayRecord):
        _refuse(what, f"gives a {type(record).__name__} as its {kind} record")
    if record.path != path:
        _refuse(what, f"names {kind} array {record.path!r}, not this run's {path!r}")
    if tuple(record.shape) != shape or record.dtype != np.dtype(dtype).str:
        _refuse(what, f"records {kind} of shape {tuple(record.shape)} {record.dtype}, not the model's {shape} "
                      f"{np.dtype(dtype).str}")
    if record.chunk_sha256 is None or record.meta_sha256 is None:
        _refuse(what, f"records no chunk digests for its {kind} array")
    try:
        stored = arrays.check(order.store, record)  # every chunk against the record, then the whole
    except arrays.ArrayDamaged as exc:
        _refuse(what, f"does not match its stored {kind} array ({exc})")
    if stored != record.sha256:
        _refuse(what, f"records a sha256 of its {kind} array that the stored array does not have")


def check_manifest(order: WorkOrder, spans: list, unit: Unit, run_id: str, manifest) -> Pending:
    """`manifest` (what a worker returned for `unit`, sent as `run_id`) once it is exactly that
    run as stored; ManifestRefused (one line) otherwise."""
    what = f"{unit.label} (run {run_id})"
    if not isinstance(manifest, Pending):
        _refuse(what, f"is a {type(manifest).__name__}, not a scored run")
    if (manifest.run_id, manifest.lang, manifest.role, manifest.seed) != (run_id, unit.lang, unit.role, unit.seed):
        _refuse(what, f"is of another run ({manifest.run_id}, {manifest.lang} {manifest.role} seed {manifest.seed})")
    group = layout.run_group(run_id)
    prov = manifest.provenance
    if manifest.group != group or not isinstance(prov, dict) or prov.get("run_id") != run_id \
            or prov.get("config_digest") != unit.digest:
        _refuse(what, "names another array group, run id or configuration digest in its record")
    indices = draw_indices(order, unit)
    if not (isinstance(manifest.indices, np.ndarray) and manifest.indices.dtype.kind in "iu"
            and np.array_equal(manifest.indices, indices) and prov.get("sample_indices") == indices.tolist()):
        _refuse(what, "gives other sample indices than the unit's draw")
    if not all(isinstance(n, (int, np.integer)) and n >= 0 for n in (manifest.n_tokens, manifest.n_truncated)):
        _refuse(what, "gives token counts that are not counts")
    records = manifest.records
    if not (isinstance(records, list) and all(isinstance(r, tuple) and len(r) == 2 for r in records)
            and sorted(kind for kind, _ in records) == ["levels", "norms"]):
        _refuse(what, "does not list exactly the run's norms and levels arrays")
    expected = {"norms": (norms_path(group), (span_layout.total_norms(spans),), np.float32),
                "levels": (levels_path(group), (span_layout.total_params(spans),), np.uint8)}
    for kind, record in records:
        _check_record(order, what, kind, record, *expected[kind])
    return manifest


def check_magnitudes(order: WorkOrder, spans: list, path: str, record) -> ArrayRecord:
    """The record a worker gives of the |W| array it wrote at `path`, once it is exactly that array as stored."""
    _check_record(order, f"|W| of {order.name}", "magnitudes", record, path,
                  (span_layout.total_params(spans),), np.float32)
    return record
