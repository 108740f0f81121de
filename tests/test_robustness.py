"""Robustness: untrusted pickles, atomic writes, and Hypothesis fuzzing of settings and GA operator invariants."""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from deap import base
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evoprune import CheckpointError, ConfigError, PruningSpace
from evoprune.evolve import operators as ops
from evoprune.evolve.fitness import FitnessConfig
from evoprune.evolve import SearchConfig
from evoprune.storage import atomic_write, load_module, load_state_dict, torch_save, write_json
from evoprune.evolve.toolbox import register

FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class _Payload:
    """A pickle that runs code when loaded: it would create the file named in ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "x": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="tensors only"):
        load_state_dict(evil)
    with pytest.raises(CheckpointError, match="trust"):
        load_module(evil)
    assert not marker.exists()
    from evoprune.evolve import checkpoint as ckpt
    os.replace(evil, tmp_path / ckpt.FILENAME)
    with pytest.raises(CheckpointError):
        ckpt.load(tmp_path, fingerprint="x", settings={})
    assert not marker.exists()


def test_a_whole_module_needs_trust_but_torchscript_does_not(tmp_path):
    net = nn.Sequential(nn.Linear(3, 2))
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_module(tmp_path / "whole.pt")
    assert isinstance(load_module(tmp_path / "whole.pt", trust=True), nn.Sequential)
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3)), tmp_path / "net.torchscript.pt")
    loaded = load_module(tmp_path / "net.torchscript.pt")
    assert torch.allclose(loaded(torch.ones(1, 3)), net(torch.ones(1, 3)))


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"ok": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as fh:
            fh.write('{"half": ')
            raise RuntimeError("crash mid-write")
    assert path.read_text().strip().startswith('{\n  "ok": 1')
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_no_truncated_file(tmp_path):
    import subprocess
    import sys
    code = (f"import os, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
            "from evoprune.storage import atomic_write\n"
            f"with atomic_write({str(tmp_path / 'big.bin')!r}) as fh:\n"
            "    fh.write(b'x' * 1000000); fh.flush(); os.kill(os.getpid(), 9)\n")
    r = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert r.returncode == -9
    assert not (tmp_path / "big.bin").exists()


def test_torch_save_is_atomic_and_loads_weights_only(tmp_path):
    torch_save({"w": torch.arange(3)}, tmp_path / "w.pt")
    assert torch.equal(load_state_dict(tmp_path / "w.pt")["w"], torch.arange(3))


# ------------------------------------------------------------------------------------------- settings fuzzing
NUMBERS = st.one_of(st.integers(-5, 50), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=2),
                    st.booleans())


def _valid_search(cfg: SearchConfig) -> bool:
    def is_int(v, lo):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def prob(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and 0 <= v <= 1
    return (is_int(cfg.rounds, 1) and is_int(cfg.generations, 1) and is_int(cfg.population, 2)
            and is_int(cfg.elites, 1) and cfg.elites <= cfg.population and prob(cfg.p_c) and prob(cfg.p_mut)
            and isinstance(cfg.target, (int, float)) and not isinstance(cfg.target, bool)
            and not math.isnan(cfg.target) and 0 < cfg.target <= 1)


@settings(max_examples=250, **FUZZ)
@given(rounds=NUMBERS, generations=NUMBERS, population=NUMBERS, elites=NUMBERS, p_c=NUMBERS, p_mut=NUMBERS,
       target=NUMBERS)
def test_search_settings_are_accepted_exactly_when_valid(rounds, generations, population, elites, p_c, p_mut,
                                                         target):
    cfg = SearchConfig(rounds=rounds, generations=generations, population=population, elites=elites, p_c=p_c,
                       p_mut=p_mut, target=target)
    if _valid_search(cfg):
        cfg.check()
    else:
        with pytest.raises(ConfigError):
            cfg.check()


@settings(max_examples=100, **FUZZ)
@given(metric=st.sampled_from(["top1", "loss", "f1", ""]), mode=st.sampled_from(["auto", "masked", "physical", "x"]),
       on_error=st.sampled_from(["raise", "worst", "skip"]), batch=st.one_of(st.integers(-3, 600), st.none()))
def test_fitness_settings_are_checked(metric, mode, on_error, batch):
    cfg = FitnessConfig(metric=metric, mode=mode, on_error=on_error, batch_size=batch)
    valid = metric in ("top1", "loss") and mode in ("auto", "masked", "physical") and \
        on_error in ("raise", "worst") and isinstance(batch, int) and batch >= 1
    if valid:
        cfg.check()
    else:
        with pytest.raises(ConfigError):
            cfg.check()


# ------------------------------------------------------------------------------------------- operator fuzzing
@pytest.fixture(scope="module")
def spaces():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
        nn.Conv2d(10, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
        nn.Conv2d(10, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    return {(mk, rt): PruningSpace.from_model(model, x, min_keep=mk, round_to=rt)
            for mk in (1, 3) for rt in (None, 4)}


@pytest.mark.slow
@settings(max_examples=200, **FUZZ)
@given(data=st.data())
def test_operators_keep_every_invariant(spaces, data):
    key = data.draw(st.sampled_from(sorted(spaces, key=str)), label="space")
    space = spaces[key]
    budget = data.draw(st.one_of(st.none(), st.floats(0.05, 1.2)), label="budget fraction")
    macs_budget = None if budget is None else budget * space.base_macs
    objective = "budget" if macs_budget is not None else data.draw(st.sampled_from(["nsga2", "topk"]))
    tb = register(base.Toolbox(), space, lambda ind: (0.0, 0.0), objective=objective, macs_budget=macs_budget,
                  p_c=data.draw(st.floats(0, 1), label="p_c"),
                  crossover=data.draw(st.sampled_from(["paper", "uniform"]), label="crossover"),
                  mutation=data.draw(st.sampled_from(["guided", "bitflip", "swap", "width", "mixed"]),
                                     label="mutation"),
                  seed=data.draw(st.integers(0, 2**16), label="seed"))
    n = len(space)
    a = tb.individual()
    b = tb.individual()
    a[:] = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n), label="a")
    b[:] = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n), label="b")
    start = space.layout.n_neurons
    pairs_before = [sorted((a[i], b[i])) for i in range(start, n)]
    children = list(tb.mate(a, b))
    # crossover swaps genes between the parents; repair never touches connection genes
    assert [sorted((children[0][i], children[1][i])) for i in range(start, n)] == pairs_before
    assert all(c.repair_pending for c in children)  # mate defers its repair ...
    children.append(tb.mutate(tb.clone(children[0]))[0])
    assert not getattr(children[-1], "repair_pending", False)  # ... to the mutation that follows
    children = tb.settle(children)  # ... or to scoring (map / settle), which repairs what is still pending
    smallest = [ops._legal_count(1, g.size, space.min_keep, space.round_to, up=False) for g in space.groups]
    for child in children:
        assert len(child) == n and set(child) <= {0, 1}
        counts = space.layout.kept_counts(child)
        for g, c in zip(space.groups, counts):
            assert c >= min(space.min_keep, g.size)
            if space.round_to:
                assert c % space.round_to == 0 or c == g.size
        space.decode(child)  # a repaired child is always a valid plan
        if macs_budget is not None:
            # within the budget, or (when even that cannot fit) shrunk to the smallest legal widths
            assert space.cost_of(child)[0] <= macs_budget or list(counts) == smallest


def test_register_refuses_bad_settings(spaces):
    space = spaces[(1, None)]
    for kwargs, match in ((dict(p_c=2), "p_c"), (dict(p_mut=-1), "p_mut"), (dict(objective="x"), "objective"),
                          (dict(objective="budget"), "macs_budget"), (dict(crossover="x"), "crossover"),
                          (dict(mutation="x"), "mutation"), (dict(elites=0), "elites"),
                          (dict(importance={"nope": [1]}), "importance")):
        with pytest.raises(ConfigError, match=match):
            register(base.Toolbox(), space, lambda ind: (0.0, 0.0), **kwargs)
    random.seed(0)
