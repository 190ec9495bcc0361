"""Interventions on math-only sets: spec grammar, plans from the archive's masks, in-place
application and bit-exact undo (Linear and Conv1D), and the loaded-model check."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import mlarch
from mlarch.errors import MlarchError, UsageError
from mlarch.evaluation import interventions as iv
from mlarch.evaluation.interventions import Intervention, ModuleChange, Plan, applied, check_modules, parse, plan
from mlarch.ingest.loading import load
from mlarch.ingest.scoring import ScoredModule, scored_modules
from mlarch.selection import top_count

LLAMA = "tiny-llama"
GPT2 = "tiny-gpt2"
GRAMMAR = "prune:LANG@K, scale:LANG@K:F, random:LANG@K or fraction:LANG@K:F"
MISMATCH = ": the masks belong to other weights; load the model that was ingested"


# --- helpers and fixtures -------------------------------------------------------------------
def _modules(archive, model):
    return archive.sql("SELECT module, n_rows, n_cols FROM modules WHERE model = ? ORDER BY position", [model]).rows()


def _load(path):
    return load(str(path), revision=None, device=torch.device("cpu"), dtype="float32").model


def _bits(tensor):
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor


def _snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _assert_state(model, expected):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert torch.equal(_bits(tensor), _bits(expected[name])), name


def _expected(before, modules, positions, how):
    """`before` with, for every scored module, the entries at the out x in positions
    (module name -> (rows, cols)) changed by `how` (numpy float32 view, in place); Conv1D
    weights are stored in x out, so there entry (r, c) lives at weight[c, r]."""
    expected = {name: t.clone() for name, t in before.items()}
    for module in modules:
        rows, cols = positions.get(module.name, ((), ()))
        if len(rows) == 0:
            continue
        stored = expected[module.name + ".weight"].numpy()
        if module.kind == "conv1d":
            stored[cols, rows] = how(stored[cols, rows])
        else:
            stored[rows, cols] = how(stored[rows, cols])
    return expected


def _mask_positions(archive, model, lang, k, modules):
    return {m.name: np.nonzero(archive.selection(model, lang, k, m.name, seed=1)) for m in modules}


def _plan_positions(the_plan, modules):
    shape = {m.name: (m.n_rows, m.n_cols) for m in modules}
    return {c.module: np.unravel_index(c.indices, shape[c.module]) for c in the_plan.changes}


class _Cached:
    """The archive with selection() memoised (each call reads the catalog and two arrays):
    plans see exactly the archive's masks, the tests just ask for them once."""

    def __init__(self, archive):
        self.archive, self.masks = archive, {}

    def __getattr__(self, name):
        return getattr(self.archive, name)

    def selection(self, model, lang, k, module, seed=None, analysis=None):
        key = (model, lang, k, module, seed, analysis)
        if key not in self.masks:
            self.masks[key] = self.archive.selection(model, lang, k, module, seed=seed, analysis=analysis)
        return self.masks[key]


@pytest.fixture(scope="module")
def llama(llama_archive):
    return _Cached(mlarch.open(llama_archive))  # read only: plans never change the archive


@pytest.fixture
def llama_model(model_dir):
    model = _load(model_dir["llama"])
    return model, scored_modules(model)


@pytest.fixture(scope="module")
def gpt2_archive(tmp_path_factory, model_dir, data):
    root = tmp_path_factory.mktemp("gpt2-archive") / "arch"
    archive = mlarch.open(root)
    archive.ingest(str(model_dir["gpt2"]), ["en", "de"], data["math"], data["control"], samples=6,
                   top_k=[0.05, 0.25], device="cpu")
    return _Cached(archive)


class _Masks:
    """A stand-in archive serving fixed masks; records every selection() call."""

    def __init__(self, masks):
        self.masks, self.calls = masks, []

    def selection(self, model, lang, k, module, seed=None, analysis=None):
        self.calls.append((model, lang, k, module, seed))
        return self.masks[module]


# --- parse -----------------------------------------------------------------------------------
GOOD = {
    "prune:en@0.01": ("prune", "en", 0.01, None),
    "scale:en@0.01:1.01": ("scale", "en", 0.01, 1.01),
    "random:de@0.01": ("random", "de", 0.01, None),
    "fraction:hi@0.01:0.5": ("fraction", "hi", 0.01, 0.5),
    "fraction:hi@0.25:1.0": ("fraction", "hi", 0.25, 1.0),
    "scale:zh-Hant@0.5:-2.0": ("scale", "zh-Hant", 0.5, -2.0),
    "prune:x_1@1e-05": ("prune", "x_1", 1e-05, None),
    "prune:" + "a" * 32 + "@0.99": ("prune", "a" * 32, 0.99, None),
}
# not canonical, but valid: label gives the canonical form
LOOSE = {"scale:en@.01:1": "scale:en@0.01:1.0", "fraction:en@1E-2:1": "fraction:en@0.01:1.0",
         "prune:en@0.0100": "prune:en@0.01", "scale:en@0.01:+2": "scale:en@0.01:2.0"}


@pytest.mark.parametrize("spec", list(GOOD))
def test_parse_good_specs_round_trip(spec):
    got = parse(spec)
    assert got == Intervention(*GOOD[spec])
    assert got.label == spec
    assert parse(got.label) == got


@pytest.mark.parametrize("spec", list(LOOSE))
def test_parse_loose_specs_give_canonical_labels(spec):
    assert parse(spec).label == LOOSE[spec]
    assert parse(LOOSE[spec]) == parse(spec)


BAD = {
    "cut:en@0.01": "unknown intervention kind 'cut'",
    "PRUNE:en@0.01": "unknown intervention kind",
    "": "unknown intervention kind ''",
    " prune:en@0.01": "unknown intervention kind",
    "prune": "missing ':'",
    "prune:en": "missing '@'",
    "prune:en0.01": "missing '@'",
    "prune:@0.01": "bad language ''",
    "prune:1en@0.01": "bad language '1en'",
    "prune:e n@0.01": "bad language",
    "prune:en.x@0.01": "bad language",
    "prune:" + "a" * 33 + "@0.01": "bad language",
    "prune:en@": "k '' in",
    "prune:en@abc": "k 'abc'",
    "prune:en@nan": "not a finite number",
    "prune:en@inf": "not a finite number",
    "prune:en@-inf": "not a finite number",
    "prune:en@1_0": "not a finite number",
    "prune:en@ 0.1": "not a finite number",
    "prune:en@0": "outside (0, 1)",
    "prune:en@1": "outside (0, 1)",
    "prune:en@1.5": "outside (0, 1)",
    "prune:en@-0.01": "outside (0, 1)",
    "prune:en@1e-400": "outside (0, 1)",  # underflows to 0
    "scale:en@0.01": "scale needs a factor",
    "scale:en@0.01:": "scale needs a factor",
    "fraction:en@0.01": "fraction needs a factor",
    "prune:en@0.01:2": "prune takes no factor",
    "random:en@0.01:0.5": "random takes no factor",
    "scale:en@0.01:nan": "factor 'nan'",
    "scale:en@0.01:inf": "not a finite number",
    "scale:en@0.01:abc": "factor 'abc'",
    "scale:en@0.01:1e999": "not a finite number",  # overflows to inf
    "scale:en@0.01:1:2": "factor '1:2'",
    "fraction:en@0.01:0": "outside (0, 1]",
    "fraction:en@0.01:1.5": "outside (0, 1]",
    "fraction:en@0.01:-0.5": "outside (0, 1]",
    "prune:en\n@0.01": "bad language",
    "prune:en@0.01\n": "not a finite number",
}


@pytest.mark.parametrize("spec", list(BAD))
def test_parse_bad_specs_one_line(spec):
    with pytest.raises(UsageError) as caught:
        parse(spec)
    message = str(caught.value)
    assert "\n" not in message and ": " in message
    assert BAD[spec] in message
    assert repr(spec) in message  # names the spec
    assert message.endswith(GRAMMAR) or GRAMMAR + " (" in message  # the fix shows the grammar


def test_intervention_checks_and_canonical_floats():
    assert Intervention("prune", "en", np.float64(0.01), None).label == "prune:en@0.01"
    assert Intervention("scale", "en", np.float32(0.5), np.float64(2)).label == "scale:en@0.5:2.0"
    for args in [("cut", "en", 0.01, None), ("prune", "e n", 0.01, None), ("prune", "en", 1.0, None),
                 ("prune", "en", float("nan"), None), ("prune", "en", 0.01, 2.0), ("scale", "en", 0.01, None),
                 ("scale", "en", 0.01, float("inf")), ("fraction", "en", 0.01, 0.0)]:
        with pytest.raises(UsageError, match=r"^[^\n]*: use prune:LANG@K"):
            Intervention(*args)
    assert iv.KINDS == ("prune", "scale", "random", "fraction")
    assert "default_rng([seed, position, stream])" in iv.RANDOM_RULE


# --- plan ------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0.05, 0.07])  # archived, and re-thresholded from the stored factors
@pytest.mark.parametrize("kind", ["prune", "scale"])
def test_plan_prune_and_scale_take_the_set(llama, kind, k):
    modules = _modules(llama, LLAMA)
    intervention = parse(f"{kind}:en@{k}" + (":1.01" if kind == "scale" else ""))
    got = plan(llama, LLAMA, intervention, 1, modules)
    masks = [llama.selection(LLAMA, "en", k, name, seed=1) for name, _, _ in modules]
    assert got.intervention == intervention and got.seed == 1
    assert got.n_set == got.n_changed == sum(int(m.sum()) for m in masks) > 0
    by_position = {c.position: c for c in got.changes}
    for position, ((name, _, _), mask) in enumerate(zip(modules, masks)):
        change = by_position.get(position)
        if change is None:
            assert not mask.any()
            continue
        assert change.module == name and change.indices.dtype == np.int64
        np.testing.assert_array_equal(change.indices, np.flatnonzero(mask))


def test_plan_sets_differ_by_language(llama):
    modules = _modules(llama, LLAMA)
    en, de = (plan(llama, LLAMA, parse(f"prune:{lang}@0.25"), 1, modules) for lang in ("en", "de"))
    assert any(not np.array_equal(a.indices, b.indices) for a, b in zip(en.changes, de.changes))


def test_plan_random_is_the_null(llama):
    modules = _modules(llama, LLAMA)
    got = plan(llama, LLAMA, parse("random:en@0.25"), 1, modules)
    again = plan(llama, LLAMA, parse("random:en@0.25"), 1, modules)
    assert got.n_set == got.n_changed > 0
    outside = 0
    for change, (name, rows, cols) in zip(got.changes, modules):
        mask = llama.selection(LLAMA, "en", 0.25, name, seed=1)
        assert change.module == name and change.indices.dtype == np.int64
        assert len(change.indices) == mask.sum()
        assert np.all(np.diff(change.indices) > 0) and (change.indices.size == 0 or change.indices[-1] < rows * cols)
        # the documented rule, verbatim (provenance)
        rule = np.sort(np.random.default_rng([1, change.position, 1]).choice(rows * cols, int(mask.sum()), replace=False))
        np.testing.assert_array_equal(change.indices, rule)
        outside += np.count_nonzero(~mask.reshape(-1)[change.indices])
    assert outside > got.n_changed / 2  # drawn from the whole matrix, not from the set
    for a, b in zip(got.changes, again.changes):
        np.testing.assert_array_equal(a.indices, b.indices)


def test_plan_random_draws_differ_by_seed_and_module():
    masks = {f"m{i}": np.zeros((40, 50), bool) for i in range(4)}
    for mask in masks.values():  # the same set everywhere
        mask[3:13, 7:17] = True
    modules = [(name, 40, 50) for name in masks]
    fake = _Masks(masks)
    one = plan(fake, "m", parse("random:en@0.05"), 1, modules)
    assert {call[4] for call in fake.calls} == {1} and len(fake.calls) == 4  # masks only from selection()
    assert fake.calls[0] == ("m", "en", 0.05, "m0", 1)
    same = plan(fake, "m", parse("random:en@0.05"), 1, modules)
    other = plan(fake, "m", parse("random:en@0.05"), 2, modules)
    assert fake.calls[-1][4] == 2
    for a, b, c in zip(one.changes, same.changes, other.changes):
        assert len(a.indices) == len(c.indices) == 100
        np.testing.assert_array_equal(a.indices, b.indices)
        assert not np.array_equal(a.indices, c.indices)
    # every module its own stream, for random and for fraction
    assert len({a.indices.tobytes() for a in one.changes}) == 4
    frac = plan(fake, "m", parse("fraction:en@0.05:0.5"), 1, modules)
    assert len({a.indices.tobytes() for a in frac.changes}) == 4
    assert all(len(a.indices) == 50 for a in frac.changes)
    # the fraction stream is not the random stream: its draw is from the set
    assert all(masks["m0"].reshape(-1)[a.indices].all() for a in frac.changes)


@pytest.mark.parametrize("fraction", [0.5, 0.29, 0.07, 1.0])
def test_plan_fraction_counts(llama, fraction):
    modules = _modules(llama, LLAMA)
    got = plan(llama, LLAMA, parse(f"fraction:de@0.25:{fraction}"), 1, modules)
    expected_total = 0
    for change, (name, _, _) in zip(got.changes, modules):
        mask = llama.selection(LLAMA, "de", 0.25, name, seed=1).reshape(-1)
        count = top_count(int(mask.sum()), fraction)
        expected_total += count
        assert len(change.indices) == count
        assert mask[change.indices].all() and np.all(np.diff(change.indices) > 0)
        rule = np.sort(np.random.default_rng([1, change.position, 2]).choice(np.flatnonzero(mask), count,
                                                                              replace=False))
        np.testing.assert_array_equal(change.indices, rule)
        if fraction == 1.0:
            np.testing.assert_array_equal(change.indices, np.flatnonzero(mask))
    assert got.n_changed == expected_total and got.n_set == plan(llama, LLAMA, parse("prune:de@0.25"), 1,
                                                                 modules).n_changed


def test_plan_passes_archive_errors_through(llama):
    modules, llama = _modules(llama, LLAMA), llama.archive  # the real archive's errors
    with pytest.raises(MlarchError) as direct:
        llama.selection(LLAMA, "fr", 0.05, modules[0][0], seed=1)
    with pytest.raises(MlarchError) as planned:
        plan(llama, LLAMA, parse("prune:fr@0.05"), 1, modules)
    assert str(planned.value) == str(direct.value) and "\n" not in str(planned.value)
    with pytest.raises(MlarchError, match="no math and control runs"):
        plan(llama, LLAMA, parse("prune:en@0.05"), 7, modules)  # no runs at seed 7
    with pytest.raises(UsageError):
        plan(llama, LLAMA, parse("prune:en@0.05"), -1, modules)


# --- applied ---------------------------------------------------------------------------------
def test_applied_prune_changes_exactly_the_set_and_undoes(llama, llama_model):
    model, modules = llama_model
    before = _snapshot(model)
    check_modules(_modules(llama, LLAMA), modules)
    the_plan = plan(llama, LLAMA, parse("prune:en@0.05"), 1, _modules(llama, LLAMA))
    expected = _expected(before, modules, _mask_positions(llama, LLAMA, "en", 0.05, modules), np.zeros_like)
    assert sum(not torch.equal(expected[n], before[n]) for n in before) >= 3  # the test sees changes
    with applied(modules, the_plan) as inside:
        assert inside.plan is the_plan and inside.n_changed == the_plan.n_changed  # float32: every entry moves
        _assert_state(model, expected)
    _assert_state(model, before)


def test_applied_scale_multiplies_exactly_the_set_and_undoes(llama, llama_model):
    model, modules = llama_model
    before = _snapshot(model)
    for factor in (1.01, 0.3, -1.7):
        the_plan = plan(llama, LLAMA, parse(f"scale:de@0.07:{factor}"), 1, _modules(llama, LLAMA))
        expected = _expected(before, modules, _mask_positions(llama, LLAMA, "de", 0.07, modules),
                             lambda v: v * np.float32(factor))
        with applied(modules, the_plan):
            _assert_state(model, expected)
        _assert_state(model, before)


@pytest.mark.parametrize("spec", ["random:bn@0.25", "fraction:bn@0.25:0.5"])
def test_applied_null_kinds_prune_the_planned_entries(llama, llama_model, spec):
    model, modules = llama_model
    before = _snapshot(model)
    the_plan = plan(llama, LLAMA, parse(spec), 1, _modules(llama, LLAMA))
    expected = _expected(before, modules, _plan_positions(the_plan, modules), np.zeros_like)
    with applied(modules, the_plan):
        _assert_state(model, expected)
    _assert_state(model, before)


def test_applied_undoes_when_the_block_raises(llama, llama_model):
    model, modules = llama_model
    before = _snapshot(model)
    the_plan = plan(llama, LLAMA, parse("scale:en@0.25:1.01"), 1, _modules(llama, LLAMA))
    with pytest.raises(RuntimeError, match="boom"):
        with applied(modules, the_plan):
            assert not torch.equal(model.state_dict()["lm_head.weight"], before["lm_head.weight"])
            raise RuntimeError("boom")
    _assert_state(model, before)
    # an empty plan changes nothing; a plan for other weights changes nothing and is refused
    with applied(modules, Plan(the_plan.intervention, 1, [], 0)):
        _assert_state(model, before)
    bad = [ModuleChange(modules[0].name, 0, np.array([0, 1], np.int64)),
           ModuleChange("model.layers.9.mlp.up_proj", 99, np.array([3], np.int64))]
    with pytest.raises(MlarchError, match="does not have"):
        with applied(modules, Plan(the_plan.intervention, 1, bad, 3)):
            pass
    big = [ModuleChange(modules[0].name, 0, np.array([modules[0].n_params], np.int64))]
    with pytest.raises(MlarchError, match="outside"):
        with applied(modules, Plan(the_plan.intervention, 1, big, 1)):
            pass
    _assert_state(model, before)


def test_applied_conv1d_changes_the_transposed_entries(gpt2_archive, model_dir):
    model = _load(model_dir["gpt2"])
    modules = scored_modules(model)
    archived = _modules(gpt2_archive, GPT2)
    assert {m.kind for m in modules} == {"conv1d"}
    check_modules(archived, modules)
    before = _snapshot(model)
    # a square module whose set is not symmetric: a forgotten transpose would hit other entries
    square = [m for m in modules if m.n_rows == m.n_cols]
    masks = [gpt2_archive.selection(GPT2, "de", 0.25, m.name, seed=1) for m in square]
    assert any(not np.array_equal(mask, mask.T) for mask in masks)
    for spec in ("prune:de@0.25", "scale:de@0.25:1.01", "random:en@0.05"):
        the_plan = plan(gpt2_archive, GPT2, parse(spec), 1, archived)
        assert the_plan.n_changed > 0
        if spec.startswith("random"):
            positions = _plan_positions(the_plan, modules)
        else:
            positions = _mask_positions(gpt2_archive, GPT2, "de", 0.25, modules)
        how = (lambda v: v * np.float32(1.01)) if spec.startswith("scale") else (np.zeros_like)
        expected = _expected(before, modules, positions, how)
        with applied(modules, the_plan):
            _assert_state(model, expected)
        _assert_state(model, before)


def test_applied_counts_the_entries_it_really_changed():
    """n_params_changed is what changed: a bfloat16 value that x1.003 rounds back to itself,
    or an entry that was 0 already, is set but not changed (the plan's n_changed counts both)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight[0, :16] = 0  # entries 0..15 are 0 already
    modules = [ScoredModule("m", layer, "linear", 0, 32, 64)]
    indices = np.arange(0, 2048, 3)
    flat = layer.weight.detach().reshape(-1)[torch.from_numpy(indices)]
    scaled = (flat * 1.003) != flat
    assert 0 < int(scaled.sum()) < len(indices)  # the case happens: some values round back, some move
    for spec, expected in (("scale:en@0.01:1.003", int(scaled.sum())), ("prune:en@0.01", int((flat != 0).sum()))):
        the_plan = Plan(parse(spec), 1, [ModuleChange("m", 0, indices)], len(indices))
        before = layer.weight.detach().clone()
        with applied(modules, the_plan) as inside:
            really = int((layer.weight.detach() != before).sum())
            assert inside.n_changed == really == expected < the_plan.n_changed == len(indices), spec
        assert torch.equal(layer.weight.detach(), before)


def test_applied_copies_no_weights():
    """~25M parameters, ~100k entries: changed in place and restored bit for bit (its speed is
    bench/interventions.py's to measure: tests assert no wall-clock times)."""
    torch.manual_seed(0)
    modules = [ScoredModule(f"m{i}", torch.nn.Linear(2048, 1024, bias=False), "linear", i, 1024, 2048)
               for i in range(12)]
    rng = np.random.default_rng(0)
    changes = [ModuleChange(m.name, i, np.sort(rng.choice(m.n_params, 8000, replace=False)))
               for i, m in enumerate(modules)]
    the_plan = Plan(parse("scale:en@0.01:1.01"), 1, changes, 96000)
    pointers = [m.module.weight.data_ptr() for m in modules]
    probe = modules[3].module.weight.detach().clone()
    with applied(modules, the_plan) as inside:
        assert [m.module.weight.data_ptr() for m in modules] == pointers  # changed in place
        assert inside.n_changed > 90000 and not torch.equal(modules[3].module.weight.detach(), probe)
    assert [m.module.weight.data_ptr() for m in modules] == pointers
    assert torch.equal(_bits(modules[3].module.weight.detach()), _bits(probe))


# --- check_modules ---------------------------------------------------------------------------
def _refusal(archived, loaded):
    with pytest.raises(MlarchError) as caught:
        check_modules(archived, loaded)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(MISMATCH)
    return message


def test_check_modules_refuses_other_weights(llama, llama_model, model_dir):
    _, modules = llama_model
    archived = _modules(llama, LLAMA)
    check_modules(archived, modules)
    # another architecture
    assert "'model.layers.0.self_attn.q_proj'" in _refusal(_modules(llama, LLAMA), scored_modules(_load(
        model_dir["gpt2"])))
    qwen = scored_modules(_load(model_dir["qwen2"]))  # same names, but the tied head is not scored
    assert "first missing: 'lm_head'" in _refusal(archived, qwen)
    # the same architecture at another size
    from transformers import AutoModelForCausalLM, LlamaConfig

    wider = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    message = _refusal(archived, scored_modules(wider))
    assert "'model.layers.0.self_attn.q_proj'" in message and "64x64" in message and "32x32" in message
    # order, extra and missing modules
    swapped = [archived[1], archived[0]] + archived[2:]
    assert "scored module 0" in _refusal(swapped, modules)
    assert "first extra" in _refusal(archived[:-1], modules)
    assert "first missing: 'extra'" in _refusal(archived + [("extra", 2, 2)], modules)
    reshaped = archived[:2] + [(archived[2][0], archived[2][2], archived[2][1])] + archived[3:]
    if archived[2][1] != archived[2][2]:
        assert "(out x in)" in _refusal(reshaped, modules)


# --- CUDA (skipped without a device) ----------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_applied_on_cuda_is_exact_and_fast(dtype):
    """~100M parameters (Linear and Conv1D), ~400k entries, on the GPU: the entries change
    as on the CPU and undo is bit-exact (apply and undo times are printed, not asserted)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    cuda = torch.device("cuda")
    modules = []
    for i in range(24):  # 24 * 2048 * 2048 ~ 100M; every other one a Conv1D (stored in x out)
        if i % 2:
            layer = Conv1D(2048, 2048).to(cuda, dtype)  # nf = out, nx = in
            layer.weight.data.normal_()
            modules.append(ScoredModule(f"m{i}", layer, "conv1d", i, 2048, 2048))
        else:
            layer = torch.nn.Linear(2048, 2048, bias=False, device=cuda, dtype=dtype)
            modules.append(ScoredModule(f"m{i}", layer, "linear", i, 2048, 2048))
    rng = np.random.default_rng(0)
    changes = [ModuleChange(m.name, i, np.sort(rng.choice(m.n_params, 17000, replace=False)))
               for i, m in enumerate(modules)]
    before = [m.module.weight.detach().clone() for m in modules]
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for spec in ("prune:en@0.01", "scale:en@0.01:1.01"):
        the_plan = Plan(parse(spec), 1, changes, 408000)
        for repeat in range(3):  # the first call pays for kernel launches' warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            with applied(modules, the_plan):
                torch.cuda.synchronize()
                middle = time.perf_counter()
                if repeat == 0:
                    for module, change, old in zip(modules, changes, before):
                        rows, cols = np.unravel_index(change.indices, (module.n_rows, module.n_cols))
                        rows, cols = torch.from_numpy(rows).to(cuda), torch.from_numpy(cols).to(cuda)
                        now = module.module.weight.detach()
                        expected = old.clone()
                        view, now_view = (expected.t(), now.t()) if module.kind == "conv1d" else (expected, now)
                        view[rows, cols] = 0 if spec.startswith("prune") else view[rows, cols] * 1.01
                        assert torch.equal(now.view(bits), expected.view(bits)), module.name
                        assert torch.equal(now_view[rows, cols].cpu().view(bits), view[rows, cols].cpu().view(bits))
            torch.cuda.synchronize()
            end = time.perf_counter()
            print(f"{spec} {dtype}: apply {middle - start:.4f} s, undo {end - middle:.4f} s")
        for module, old in zip(modules, before):
            assert torch.equal(module.module.weight.detach().view(bits), old.view(bits)), module.name
