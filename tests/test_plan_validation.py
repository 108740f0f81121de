"""Plan and individual validation on a small CNN, with Hypothesis: every malformed individual or plan is refused
with a PlanError that names the group / connection / problem, before any module is touched; valid individuals
round-trip through plans and JSON, and dropping channels never makes a plan more expensive."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evoprune import EvoPruneError, PlanError, PruningPlan, PruningSpace, apply_plan, masked

pytestmark = pytest.mark.usefixtures("torch_single_thread")
SIZES = {"0": 8, "3": 8, "6": 12}  # channel groups of the small model, in network order
UNIT = "3"  # the 1x1 8->8 conv-BN-ReLU run: a sequential connection unit
NOT_UNITS = ("0", "1", "2", "4", "6", "11", "")  # modules (or the root) that are not cuttable units
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # input-preserving 1x1 conv
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )


@dataclass
class Small:
    model: nn.Module
    x: torch.Tensor
    space: PruningSpace  # min_keep=1
    space3: PruningSpace  # min_keep=3
    other: PruningSpace  # same model, other input size: another fingerprint
    out: torch.Tensor


@pytest.fixture(scope="module")
def small(randomize_bn) -> Small:
    model = randomize_bn(small_cnn(), seed=3).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    space = PruningSpace.from_model(model, x)
    with torch.no_grad():
        out = model(x)
    return Small(model, x, space, PruningSpace.from_model(model, x, min_keep=3),
                 PruningSpace.from_model(model, torch.randn(1, 3, 12, 12)), out)


def test_small_space_is_what_these_tests_assume(small):
    sp = small.space
    assert [(g.name, g.size) for g in sp.groups] == list(SIZES.items())
    assert [(u.name, u.kind) for u in sp.units] == [(UNIT, "sequential")]
    assert len(sp) == sum(SIZES.values()) + 1
    assert small.space3.fingerprint != sp.fingerprint != small.other.fingerprint
    assert small.space3.layout == sp.layout


# ---------------------------------------------------------------------------------------------- helpers
def assert_rejected(small: Small, plan, fragments, *, space=None, without_space=False):
    """``plan`` is refused by every entry point with a PlanError containing all ``fragments``, and the model is
    left exactly as it was."""
    space = space or small.space
    check = _guard(small.model)
    calls = [
        ("validate", lambda: space.validate(plan)),
        ("encode", lambda: space.encode(plan)),
        ("cost", lambda: space.cost(plan)),
        ("apply_plan", lambda: apply_plan(small.model, plan, small.x, space=space)),
        ("masked", lambda: masked(small.model, plan, space).__enter__()),
    ]
    if without_space:  # apply_plan rediscovers the (min_keep=1) space itself
        calls.append(("apply_plan(no space)", lambda: apply_plan(small.model, plan, small.x)))
    for what, call in calls:
        with pytest.raises(PlanError) as info:
            call()
        for frag in fragments:
            assert frag in str(info.value), (what, frag, str(info.value))
        check()
    with torch.no_grad():
        torch.testing.assert_close(small.model(small.x), small.out, atol=0, rtol=0)


def _guard(model):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    structure = [(n, type(m)) for n, m in model.named_modules()]

    def check():
        now = model.state_dict()
        assert list(now) == list(state)
        assert all(torch.equal(now[k], v) for k, v in state.items())
        assert [(n, type(m)) for n, m in model.named_modules()] == structure

    return check


def group_slices(space):
    return {g.name: space.layout.group_slice(i) for i, g in enumerate(space.groups)}


@st.composite
def kept_sets(draw, min_keep=1, names=tuple(SIZES)):
    """Valid kept indices for some groups (a mapping name -> sorted tuple)."""
    out = {}
    for name in names:
        out[name] = tuple(sorted(draw(st.sets(st.integers(0, SIZES[name] - 1), min_size=min_keep,
                                                max_size=SIZES[name]))))
    return out


@st.composite
def valid_individuals(draw, min_keep=1):
    genes = []
    for name, idxs in draw(kept_sets(min_keep)).items():
        bits = [0] * SIZES[name]
        for k in idxs:
            bits[k] = 1
        genes += bits
    return genes + [draw(st.integers(0, 1))]


BAD_GENES = st.one_of(
    st.integers().filter(lambda v: v not in (0, 1)),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: v not in (0.0, 1.0)),
    st.text(max_size=3),
    st.binary(max_size=2),
    st.none(),
    st.just({}),
)


# ---------------------------------------------------------------------------------------------- individuals
def test_wrong_length_individuals(small):
    sp = small.space
    n = len(sp)
    for genes in ([], [1] * (n - 1), [1] * (n + 1), [1] * sp.layout.n_neurons):
        with pytest.raises(PlanError, match=f"individual has {len(genes)} genes, this space needs {n}"):
            sp.decode(genes)
        with pytest.raises(PlanError, match="genes"):
            sp.cost_of(genes)


@pytest.mark.parametrize("bad", [2, -1, 0.5, None, "1", float("nan")])
def test_genes_other_than_0_1(small, bad):
    genes = small.space.layout.ones()
    genes[5] = bad
    with pytest.raises(PlanError, match=r"gene 5 is .*; genes must be 0 or 1"):
        small.space.decode(genes)


def test_bool_and_integral_float_genes_are_accepted(small):
    sp = small.space
    ones = sp.layout.ones()
    assert sp.decode([True] * len(ones)) == sp.decode(ones) == sp.decode(np.ones(len(ones)))


@pytest.mark.parametrize("min_keep", [1, 3])
def test_groups_emptied_below_min_keep(small, min_keep):
    sp = small.space if min_keep == 1 else small.space3
    for name, sl in group_slices(sp).items():
        genes = sp.layout.ones()
        genes[sl] = [0] * (sl.stop - sl.start)
        genes[sl.start: sl.start + min_keep - 1] = [1] * (min_keep - 1)
        with pytest.raises(PlanError, match=f"group '{name}' keeps {min_keep - 1} of {SIZES[name]} channels, "
                                            f"below min_keep={min_keep}"):
            sp.decode(genes)


@pytest.mark.parametrize("bad", [[[0, 1]], [np.array([1, 0])], [1 + 0j], ["", b"\x80"]], ids=str)
def test_nested_or_complex_genes_raise_plan_error(small, bad):
    genes = small.space.layout.ones()
    genes[-len(bad):] = bad
    with pytest.raises(PlanError):
        small.space.decode(genes)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_malformed_individuals_are_rejected(small, data):
    kind = data.draw(st.sampled_from(["length", "gene", "min_keep"]), label="kind")
    sp = data.draw(st.sampled_from([small.space, small.space3]), label="space") if kind == "min_keep" \
        else small.space
    genes = data.draw(valid_individuals(sp.min_keep), label="valid start")
    n = len(sp)
    if kind == "length":
        length = data.draw(st.integers(0, 2 * n).filter(lambda k: k != n), label="length")
        genes = (genes * 3)[:length]
        pattern = [f"individual has {length} genes, this space needs {n}"]
    elif kind == "gene":
        positions = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=4), label="positions")
        for p in positions:
            genes[p] = data.draw(BAD_GENES, label=f"gene {p}")
        pattern = [f"gene {min(positions)} is ", "genes must be 0 or 1"]
    else:
        name = data.draw(st.sampled_from(list(SIZES)), label="group")
        sl = group_slices(sp)[name]
        keep = data.draw(st.sets(st.integers(sl.start, sl.stop - 1), max_size=sp.min_keep - 1), label="kept")
        genes[sl] = [int(i in keep) for i in range(sl.start, sl.stop)]
        # the first group below min_keep is reported (earlier groups may have been left valid)
        pattern = [f"group '{name}' keeps {len(keep)} of {SIZES[name]} channels", f"min_keep={sp.min_keep}"]
    # cost_of is the GA's fast path: it checks the genes but, by design, not min_keep (repair guarantees it)
    for call in (sp.decode, sp.cost_of) if kind != "min_keep" else (sp.decode,):
        with pytest.raises(PlanError) as info:
            call(genes)
        for frag in pattern:
            assert frag in str(info.value), (frag, str(info.value))


# ---------------------------------------------------------------------------------------------- plans
def test_unknown_group(small):
    plan = PruningPlan(groups={"features.0": (0, 1)})
    assert_rejected(small, plan, ["unknown group 'features.0'", "groups are: 0, 3, 6"], without_space=True)
    assert_rejected(small, PruningPlan(groups={"1": (0,)}), ["unknown group '1'"])  # a BN member, not a root


@pytest.mark.parametrize("name,idxs,bad", [("0", (0, 8), 8), ("3", (-1, 2), -1), ("6", (0, 1, 100), 100)])
def test_out_of_range_index(small, name, idxs, bad):
    assert_rejected(small, PruningPlan(groups={name: idxs}),
                    [f"group '{name}': index {bad} is out of range [0, {SIZES[name]})"], without_space=name == "0")


def test_duplicate_index(small):
    assert_rejected(small, PruningPlan(groups={"6": (0, 3, 3, 5)}), ["group '6': index 3 is listed twice"],
                    without_space=True)


def test_group_emptied_below_min_keep(small):
    assert_rejected(small, PruningPlan(groups={"3": ()}), ["group '3' keeps 0 of 8 channels, below min_keep=1"],
                    without_space=True)
    assert_rejected(small, PruningPlan(groups={"0": (1, 7)}), ["group '0' keeps 2 of 8", "min_keep=3"],
                    space=small.space3)


@pytest.mark.parametrize("name", ["nope", *NOT_UNITS])
def test_unknown_or_uncuttable_connection(small, name):
    for state in (False, True):
        assert_rejected(small, PruningPlan(connections={name: state}),
                        [f"connection '{name}' is not a cuttable unit", "cuttable: 3"], without_space=name == "0")


def test_plan_for_another_space(small):
    for other in (small.other, small.space3):
        plan = other.full_plan()
        assert_rejected(small, plan, [f"fingerprint {other.fingerprint}", small.space.fingerprint,
                                      "another pruning space"], without_space=True)
    assert_rejected(small, PruningPlan(fingerprint="0123456789abcdef"), ["another pruning space"])


def test_valid_plan_from_this_space_applies_without_the_space(small, state_guard):
    check = state_guard(small.model)
    plan = PruningPlan(groups={"0": (0, 2, 4)}, connections={UNIT: False}, fingerprint=small.space.fingerprint)
    pruned = apply_plan(small.model, plan, small.x)
    check()
    assert tp.utils.count_ops_and_params(pruned, small.x) == small.space.cost(plan)


@pytest.mark.parametrize("groups,connections,fragment", [
    ({"0": (0, 1.5)}, {}, "group '0': index 1.5 is not an integer"),
    ({"0": ("a",)}, {}, "group '0': index 'a' is not an integer"),
    ({"0": (True, 2)}, {}, "group '0': index True is not an integer"),
    ({"0": None}, {}, "group '0': kept indices must be a sequence of ints"),
    ({"0": 3}, {}, "group '0': kept indices must be a sequence of ints"),
    ({0: (1,)}, {}, "group names must be strings"),
    ({}, {UNIT: 2}, "connection '3': state must be True/False"),
    ({}, {UNIT: "no"}, "connection '3': state must be True/False"),
    ({}, {UNIT: None}, "connection '3': state must be True/False"),
    ([("0", (1,))], {}, "must be mappings"),
])
def test_malformed_values_rejected_at_construction(groups, connections, fragment):
    with pytest.raises(PlanError, match=re.escape(fragment)):
        PruningPlan(groups=groups, connections=connections)


def test_malformed_json_and_dicts(small):
    for text in ("", "{", "[1, 2]", '{"connections": {}}', "null"):
        with pytest.raises(PlanError):
            PruningPlan.from_json(text)
    with pytest.raises(PlanError, match="'groups' entry"):
        PruningPlan.from_dict({"connections": {UNIT: False}})
    with pytest.raises(PlanError, match="index 'x' is not an integer"):
        PruningPlan.from_json(json.dumps({"groups": {"0": ["x"]}}))


def test_non_plans_are_plan_errors(small):
    for bad in ({"groups": {}}, None, [1, 0]):
        with pytest.raises(PlanError, match="PruningPlan"):
            small.space.validate(bad)
        with pytest.raises(PlanError, match="PruningPlan"):
            apply_plan(small.model, bad, small.x, space=small.space)


def test_one_except_clause_catches_every_refusal(small):
    """A caller catches whatever evoprune refuses with ``except EvoPruneError`` (and a bad value with ValueError,
    as for any Python API), here a plan, a setting and a model that evoprune turns down."""
    from evoprune import PruningSpace, SearchConfig
    refusals = [lambda: small.space.validate(None), lambda: SearchConfig(population=1).check(),
                lambda: PruningSpace.from_model(small.model, torch.zeros(1, 5, 8, 8))]
    for refuse in refusals:
        with pytest.raises(EvoPruneError) as caught:
            refuse()
        assert str(caught.value)
    for refuse in refusals[:2]:
        with pytest.raises(ValueError):
            refuse()


_calls = [0]
MALFORMED_PLAN_KINDS = ["unknown_group", "out_of_range", "duplicate", "below_min_keep", "unknown_connection",
                        "fingerprint"]


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_malformed_plans_are_rejected(small, data):
    kind = data.draw(st.sampled_from(MALFORMED_PLAN_KINDS), label="kind")
    sp = small.space3 if kind == "below_min_keep" and data.draw(st.booleans(), label="min_keep=3") \
        else small.space
    # start from a valid partial plan: some groups, maybe the connection
    names = data.draw(st.sets(st.sampled_from(list(SIZES))), label="groups given")
    groups = dict(data.draw(kept_sets(sp.min_keep, tuple(sorted(names))), label="kept"))
    conns = data.draw(st.one_of(st.just({}), st.booleans().map(lambda b: {UNIT: b})), label="connections")
    fingerprint = data.draw(st.sampled_from([None, sp.fingerprint]), label="fingerprint")
    target = data.draw(st.sampled_from(list(SIZES)), label="target group")
    size = SIZES[target]
    # only the target group is broken, so that the error must name it whatever order groups are checked in
    if kind == "unknown_group":
        name = data.draw(st.text(max_size=12).filter(lambda s: s not in SIZES), label="unknown name")
        groups[name] = tuple(range(data.draw(st.integers(0, 3))))
        fragments = [f"unknown group {name!r}"]
    elif kind == "out_of_range":
        bad = data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=size)), label="bad index")
        good = data.draw(st.sets(st.integers(0, size - 1), min_size=sp.min_keep, max_size=size), label="good")
        idxs = sorted(good)
        idxs.insert(data.draw(st.integers(0, len(idxs)), label="at"), bad)
        groups[target] = tuple(idxs)
        fragments = [f"group {target!r}: index {bad} is out of range [0, {size})"]
    elif kind == "duplicate":
        good = sorted(data.draw(st.sets(st.integers(0, size - 1), min_size=max(1, sp.min_keep), max_size=size),
                                label="good"))
        dup = data.draw(st.sampled_from(good), label="dup")
        idxs = good + [dup]
        idxs = data.draw(st.permutations(idxs), label="order")
        groups[target] = tuple(idxs)
        first_dup = next(i for i in idxs if idxs.count(i) > 1)
        fragments = [f"group {target!r}: index {first_dup} is listed twice"]
    elif kind == "below_min_keep":
        keep = data.draw(st.sets(st.integers(0, size - 1), max_size=sp.min_keep - 1), label="kept")
        groups[target] = tuple(sorted(keep))
        fragments = [f"group {target!r} keeps {len(keep)} of {size} channels, below min_keep={sp.min_keep}"]
    elif kind == "unknown_connection":
        name = data.draw(st.one_of(st.sampled_from(NOT_UNITS), st.text(max_size=12)).filter(lambda s: s != UNIT),
                         label="connection")
        conns = {**conns, name: data.draw(st.booleans(), label="state")}
        fragments = [f"connection {name!r} is not a cuttable unit"]
    else:
        fingerprint = data.draw(st.text("0123456789abcdef", min_size=1, max_size=16)
                                .filter(lambda s: s != sp.fingerprint), label="foreign fingerprint")
        fragments = ["another pruning space", f"fingerprint {fingerprint}"]
    plan = PruningPlan(groups=groups, connections=conns, fingerprint=fingerprint)
    _calls[0] += 1  # every 15th example also lets apply_plan rediscover the space (slow: a trace each)
    without_space = sp is small.space and _calls[0] % 15 == 0
    assert_rejected(small, plan, fragments, space=sp, without_space=without_space)


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_malformed_values_are_rejected_at_construction(data):
    if data.draw(st.booleans(), label="in groups"):
        bad = data.draw(st.one_of(st.floats(), st.text(max_size=3), st.none(), st.booleans(),
                                  st.lists(st.integers(), max_size=2)), label="bad index")
        d = {"groups": {"0": [0, bad]}, "connections": {}}
        fragment = "group '0': index"
    else:
        bad = data.draw(st.one_of(st.integers().filter(lambda v: v not in (0, 1)),
                                  st.floats().filter(lambda v: v not in (0.0, 1.0)), st.text(max_size=3),
                                  st.none(), st.lists(st.booleans(), max_size=2)), label="bad state")
        d = {"groups": {}, "connections": {UNIT: bad}}
        fragment = "connection '3': state must be True/False"
    with pytest.raises(PlanError, match=re.escape(fragment)):
        PruningPlan(**d)
    with pytest.raises(PlanError, match=re.escape(fragment)):
        PruningPlan.from_dict(d)
    try:
        text = json.dumps(d)
    except (TypeError, ValueError):
        return
    with pytest.raises(PlanError):
        PruningPlan.from_json(text)


# ---------------------------------------------------------------------------------------------- valid plans
@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_decode_encode_round_trip(small, data):
    sp = data.draw(st.sampled_from([small.space, small.space3]), label="space")
    genes = data.draw(valid_individuals(sp.min_keep), label="individual")
    plan = sp.decode(genes)
    sp.validate(plan)
    assert plan.fingerprint == sp.fingerprint
    assert sp.encode(plan) == genes
    assert list(sp.layout.kept_counts(genes)) == [len(plan.groups[n]) for n in SIZES]
    assert plan.connections == {UNIT: bool(genes[-1])}
    assert sp.decode(sp.encode(plan)) == plan


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_plan_json_round_trip(small, data):
    names = data.draw(st.sets(st.sampled_from(list(SIZES))), label="groups given")
    groups = data.draw(kept_sets(1, tuple(sorted(names))), label="kept")
    conns = data.draw(st.one_of(st.just({}), st.booleans().map(lambda b: {UNIT: b})), label="connections")
    fp = data.draw(st.sampled_from([None, small.space.fingerprint]), label="fingerprint")
    plan = PruningPlan(groups=groups, connections=conns, fingerprint=fp)
    small.space.validate(plan)
    text = plan.to_json()
    assert PruningPlan.from_json(text) == plan
    assert PruningPlan.from_dict(json.loads(text)) == plan
    assert PruningPlan.from_dict(plan.to_dict()) == plan
    # a partial plan keeps the missing groups whole and the missing connection active
    full = small.space.decode(small.space.encode(plan))
    assert all(full.groups[n] == tuple(groups.get(n, range(SIZES[n]))) for n in SIZES)
    assert small.space.cost(plan) == small.space.cost(full)


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def test_cost_decreases_monotonically_when_dropping_channels(small, data):
    sp = data.draw(st.sampled_from([small.space, small.space3]), label="space")
    genes = data.draw(valid_individuals(sp.min_keep), label="individual")
    slices = group_slices(sp)
    plan = sp.decode(genes)
    macs, params = sp.cost(plan)
    assert sp.cost_of(genes) == (macs, params)
    assert macs <= sp.base_macs and params <= sp.base_params
    alive = sp.alive(plan)
    for _ in range(data.draw(st.integers(1, 12), label="drops")):
        droppable = [n for n, sl in slices.items() if sum(genes[sl]) > sp.min_keep]
        if not droppable:
            break
        name = data.draw(st.sampled_from(droppable), label="group")
        sl = slices[name]
        kept = [i for i in range(sl.start, sl.stop) if genes[i]]
        genes[data.draw(st.sampled_from(kept), label="channel")] = 0
        plan = sp.decode(genes)
        m2, p2 = sp.cost(plan)
        if any(alive(m) for m in sp.group(name).members):  # a live group: strictly cheaper
            assert m2 < macs and p2 < params, name
        else:  # bypassed with its connection unit: no change
            assert (m2, p2) == (macs, params), name
        macs, params = m2, p2


@settings(max_examples=25, **SETTINGS)
@given(genes=valid_individuals())
def test_random_valid_plans_cost_exactly_and_mask_like_the_physical_model(small, genes):
    sp = small.space
    plan = sp.decode(genes)
    check = _guard(small.model)
    pruned = apply_plan(small.model, plan, small.x, space=sp).eval()
    check()
    assert tp.utils.count_ops_and_params(pruned, small.x) == sp.cost(plan)
    with torch.no_grad():
        y = pruned(small.x)
        with masked(small.model, plan, sp) as m:
            y_masked = m(small.x)
    torch.testing.assert_close(y_masked, y, atol=1e-5, rtol=1e-4)
    widths = sp.widths(plan)
    assert pruned[0].out_channels == widths["0"] and pruned[6].out_channels == widths["6"]
    if genes[-1]:
        assert pruned[3].out_channels == widths["3"] == len(plan.groups["3"])
    else:
        assert isinstance(pruned[3], nn.Identity) and widths["3"] == widths["0"]
    check()
