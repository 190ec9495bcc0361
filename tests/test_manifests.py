"""A Ray worker's manifest is untrusted input to the driver (mlarch/ingest/manifests.py).

Real manifests come from scoring two units of the tiny Llama here, exactly as a worker does
(units.score_run, arrays written to the archive's store, levels dropped); each forgery below
is one a worker with another mlarch, a bug or bad intent could return, and each is refused
with one line before anything is committed."""

import dataclasses

import numpy as np
import pytest

from mlarch.ingest import commit, manifests, units
from mlarch.ingest.config import IngestConfig
from mlarch.ingest.context import prepare
from mlarch.ingest.planning import plan
from mlarch.store import arrays


@pytest.fixture(scope="module")
def scored(tmp_path_factory, model_dir, data):
    """The plan's work order, the model's spans and (unit, run id, manifest) of en math and control."""
    root = tmp_path_factory.mktemp("manifests") / "arch"
    cfg = IngestConfig(model=str(model_dir["llama"]), langs=["en"], math=data["math"], control=data["control"],
                       samples=3, top_k=[0.05, 0.25], device="cpu")
    cfg.validate()
    work = plan(root, cfg, units.Reporter())
    order = units.work_order(work)
    ctx = prepare(order, units.Reporter())
    ctx.extract_magnitudes()
    commit.open_catalog(work)
    run_ids = commit.begin_runs(work, work.todo)
    done = []
    for unit, run_id in zip(work.todo, run_ids):
        pending = units.score_run(ctx, unit, run_id).result()
        pending.levels = None  # as a worker returns it
        done.append((unit, run_id, pending))
    magnitudes = units.write_array(order.store, "models/tiny/magnitudes", ctx.magnitudes)
    return order, ctx.info.spans(), done, magnitudes


def _record(manifest, kind):
    return dict(manifest.records)[kind]


def _with_record(manifest, kind, record):
    return dataclasses.replace(manifest, records=[(k, record if k == kind else r) for k, r in manifest.records])


def test_a_true_manifest_passes(scored):
    order, spans, done, magnitudes = scored
    for unit, run_id, manifest in done:
        assert manifests.check_manifest(order, spans, unit, run_id, manifest) is manifest
    assert manifests.check_magnitudes(order, spans, "models/tiny/magnitudes", magnitudes) is magnitudes


def _forgeries(done):
    (unit, run_id, ok), (_, other_id, other) = done
    norms = _record(ok, "norms")
    yield "duplicate: the other unit's manifest", other, "is of another run"
    yield "another run id", dataclasses.replace(ok, run_id=other_id), "is of another run"
    yield "another role", dataclasses.replace(ok, role=other.role), "is of another run"
    yield "a path outside the store", _with_record(ok, "norms", dataclasses.replace(norms, path="../../../etc/x")), \
        "not this run's"
    yield "the other run's array (same digests)", _with_record(ok, "norms", _record(other, "norms")), \
        "not this run's"
    yield "a sha256 the stored array lacks", _with_record(ok, "norms", dataclasses.replace(norms, sha256="0" * 64)), \
        "sha256"
    yield "chunk digests of other bytes", _with_record(
        ok, "norms", dataclasses.replace(norms, chunk_sha256=tuple("0" * 64 for _ in norms.chunk_sha256))), \
        "does not match its stored norms"
    yield "no chunk digests", _with_record(ok, "norms", dataclasses.replace(norms, chunk_sha256=None)), \
        "no chunk digests"
    yield "another shape", _with_record(ok, "norms", dataclasses.replace(norms, shape=(3,))), "shape"
    yield "a third array", dataclasses.replace(ok, records=ok.records + [("levels", _record(ok, "levels"))]), \
        "exactly the run's norms and levels"
    yield "not a record", _with_record(ok, "levels", {"path": "x"}), "gives a dict"
    yield "other sample indices", dataclasses.replace(ok, indices=ok.indices[::-1].copy()), "sample indices"
    yield "another group", dataclasses.replace(ok, group="runs/elsewhere"), "another array group"
    yield "another config digest", dataclasses.replace(
        ok, provenance={**ok.provenance, "config_digest": "f" * 64}), "configuration digest"
    yield "negative tokens", dataclasses.replace(ok, n_tokens=-1), "token counts"
    yield "not a run at all", {"run_id": run_id}, "is a dict"


@pytest.mark.parametrize("case", range(16))
def test_a_forged_manifest_is_refused_in_one_line(scored, case):
    order, spans, done, _ = scored
    unit, run_id, _ = done[0]
    name, forged, expected = list(_forgeries(done))[case]
    with pytest.raises(manifests.ManifestRefused) as caught:
        manifests.check_manifest(order, spans, unit, run_id, forged)
    message = str(caught.value)
    assert expected in message and "\n" not in message, (name, message)
    assert message.startswith(f"a Ray worker's manifest for {unit.label} (run {run_id})"), message


def test_stored_bytes_that_differ_from_the_manifest_are_refused(scored, tmp_path):
    """A worker that reports the digests of what it meant to write, while the store holds other bytes
    (a partial rewrite, another writer): the recount from the store refuses it."""
    order, spans, done, _ = scored
    unit, run_id, manifest = done[0]
    norms = _record(manifest, "norms")
    real = arrays.read(order.store, norms)
    try:
        units.write_array(order.store, norms.path, real + 1, compress=False)  # same shape, other bytes
        with pytest.raises(manifests.ManifestRefused, match="does not match its stored norms"):
            manifests.check_manifest(order, spans, unit, run_id, manifest)
    finally:
        assert units.write_array(order.store, norms.path, real, compress=False).sha256 == norms.sha256


def test_a_forged_magnitudes_record_is_refused(scored):
    order, spans, _, magnitudes = scored
    with pytest.raises(manifests.ManifestRefused, match="not this run's"):
        manifests.check_magnitudes(order, spans, "models/other/magnitudes", magnitudes)
    with pytest.raises(manifests.ManifestRefused, match="sha256"):
        manifests.check_magnitudes(order, spans, magnitudes.path, dataclasses.replace(magnitudes, sha256="1" * 64))
    assert np.array_equal(arrays.read(order.store, magnitudes).shape, magnitudes.shape)
