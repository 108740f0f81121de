"""Latency: end-to-end measurement, the latency table (accuracy against real measurements, cache, faults), and
latency as the search objective (search, DEAP toolbox, command line)."""
from __future__ import annotations

import importlib.util
import json
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from deap import base

from evoprune import ConfigError, PruningPlan, PruningSpace, apply_plan
from evoprune.deploy import latency as lat
from evoprune.evolve import search
from evoprune.evolve.fitness import Evaluator
from evoprune.deploy.latency import LatencyTable, LatencyWarning, measure, time_call
from evoprune.evolve.toolbox import register

pytestmark = pytest.mark.usefixtures("torch_single_thread")
ORT = pytest.param("onnxruntime", marks=pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                                           reason="needs the onnx extra"))


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    model = net()
    space = PruningSpace.from_model(model, X, round_to=8)
    return model, space, LatencyTable.measure(model, space, X, step=8,
                                              cache_dir=tmp_path_factory.mktemp("cache"))


def plan_of(space, counts, cut=()):
    return PruningPlan({g.name: tuple(range(c)) for g, c in zip(space.groups, counts)},
                       {u.name: u.name not in cut for u in space.units}, fingerprint=space.fingerprint)


@pytest.mark.parametrize("runtime", [ORT, "torch"])
def test_measure_times_a_model_and_a_smaller_model_is_faster(runtime):
    big = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1)).eval()
    small = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    tb, ts = (measure(m, X, runtime=runtime, repeats=10) for m in (big, small))
    assert tb.median_ms > 0 and ts.median_ms > 0 and tb.repeats >= 10
    assert ts.median_ms < tb.median_ms  # ~64x fewer MACs: no noise covers that
    assert torch.get_num_threads() == 1  # restored


@pytest.mark.slow
def test_the_table_predicts_measured_latency_of_real_pruned_models(table):
    """The ground truth is an end-to-end measurement of the physically pruned model; the bound is loose (a shared,
    noisy machine): median relative error under 35 %, and the ordering of a large and a small plan is right."""
    model, space, tab = table
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(6):
        counts = [int(8 * rng.integers(1, g.size // 8 + 1)) for g in space.groups]
        plan = plan_of(space, counts)
        measured = measure(apply_plan(model, plan, X, space=space), X, repeats=15).median_ms
        errors.append(abs(tab.predict(plan) / measured - 1))
    assert np.median(errors) < 0.35, errors
    small, large = plan_of(space, [8] * len(space.groups)), space.full_plan()
    assert tab.predict(small) < tab.predict(large)
    assert tab.predict(large) == pytest.approx(tab.base_ms, rel=0.05)


def test_prediction_by_genes_plan_and_counts_agree(table):
    _, space, tab = table
    counts = [16] * len(space.groups)
    plan = plan_of(space, counts)
    genes = space.encode(plan)
    assert tab.predict(plan) == tab.predict_genes(genes) == tab.predict_counts(counts, [True] * len(space.units))


@pytest.mark.slow
def test_a_cached_table_is_reused_and_one_from_elsewhere_is_not(tmp_path):
    model = net()
    space = PruningSpace.from_model(model, X)
    first = LatencyTable.measure(model, space, X, step=8, cache_dir=tmp_path)
    files = list((tmp_path / "latency").glob("onnxruntime-*.json"))
    assert len(files) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatencyWarning)
        again = LatencyTable.measure(model, space, X, step=8, cache_dir=tmp_path)
    assert again.fit == first.fit and again.base_ms == first.base_ms  # loaded, not re-measured
    data = json.loads(files[0].read_text())
    data["key"]["cpu"] = "Some Other CPU 9000"
    files[0].write_text(json.dumps(data))
    with pytest.warns(LatencyWarning, match="not used: it was measured with cpu 'Some Other CPU 9000'"):
        LatencyTable.measure(model, space, X, step=8, cache_dir=tmp_path)
    assert json.loads(files[0].read_text())["key"]["cpu"] == lat.cpu_model()  # re-measured and replaced


@pytest.mark.slow
def test_a_corrupt_cache_is_rebuilt_not_trusted(tmp_path):
    model = net()
    space = PruningSpace.from_model(model, X)
    LatencyTable.measure(model, space, X, step=8, cache_dir=tmp_path)
    path = next((tmp_path / "latency").glob("onnxruntime-*.json"))
    path.write_text(path.read_text()[:200])
    with pytest.warns(LatencyWarning, match="unreadable"):
        rebuilt = LatencyTable.measure(model, space, X, step=8, cache_dir=tmp_path)
    assert rebuilt.base_ms > 0 and json.loads(path.read_text())["key"]["space"] == space.fingerprint


def test_a_missing_runtime_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name))
    with pytest.raises(ConfigError, match=r"evoprune\[onnx\]"):
        measure(net(), X)
    with pytest.raises(ConfigError, match=r"runtime must be one of onnxruntime, torch"):
        lat.check_runtime("tflite")


def test_unstable_timings_get_more_repeats_and_a_warning():
    durations = iter([0.0] * 8 + [0.002, 0.0001] * 500)

    def run():
        import time
        end = time.perf_counter() + next(durations, 0.0)
        while time.perf_counter() < end:
            pass
    with pytest.warns(LatencyWarning, match="unstable timings"):
        t = time_call(run, warmup=1, repeats=8, max_repeats=32, sample_ms=0.0001)
    assert t.repeats == 32 and t.spread > 0.15


@pytest.mark.slow
def test_a_budget_below_the_smallest_plan_is_refused_before_any_search(monkeypatch, table, tmp_path):
    model, space, tab = table
    import evoprune.evolve.loop as evolve
    calls = []
    monkeypatch.setattr(evolve, "register", lambda *a, **k: calls.append(1))
    x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))
    with pytest.raises(ConfigError, match=r"target_latency_ms 1e-05 ms is below what the smallest legal plan "
                                          r"reaches .* ask for at least \d"):
        search(model, X, x, y, target_kind="latency", target=1e-5, fitness=_no_recal(), reconstruct="none",
               verbose=False, latency_cache=str(tmp_path))
    assert not calls


def _no_recal():
    from evoprune.evolve.fitness import FitnessConfig
    return FitnessConfig(bn_recalibration=False)


@pytest.mark.slow
def test_search_with_a_latency_target_meets_it_and_reports_measured_latency(trained_tiny, tmp_path):
    model, data = trained_tiny(600, 300, data_seed=0, epochs=2)
    from evoprune.data import normalize
    x, y = normalize(data.val.images), data.val.labels
    target = 0.5 * measure(model, x[:1]).median_ms

    def run(target):
        return search(model, x[:1], x, y, rounds=2, generations=1, population=6, elites=2, target_kind="latency",
                      target=target, fitness=_no_recal(), reconstruct="none", verbose=False, progress=False,
                      latency_cache=str(tmp_path))
    try:
        res = run(target)
    except ConfigError as exc:  # a loaded machine: the smallest legal plan times above half the teacher
        floor = re.search(r"ask for at least ([\d.]+) ms", str(exc))
        if floor is None:
            raise
        target = 1.1 * float(floor.group(1))
        res = run(target)
    assert res.cost == "ms"
    assert res.baseline["latency_ms"] > 0 and all("latency_ms" in r and "predicted_ms" in r for r in res.rows)
    assert all(r["predicted_ms"] <= r["budget"] * 1.0001 for r in res.rows)
    assert res.rows[-1]["budget"] == pytest.approx(target)
    assert res.rows[-1]["macs"] < res.baseline["macs"]
    step = lat.kernel_step()
    first = PruningSpace.from_model(model, x[:1])
    for name, kept in res.plans[0]["groups"].items():  # snapped: widths the CPU's kernels like
        assert len(kept) % step == 0 or len(kept) == first.group(name).size, (name, len(kept))
    assert {"best_ms", "min_ms", "best_mmacs"} <= set(res.logbook.header) and "latency (ms, batch 1)" in res.table()
    assert all(0 < rec["best_mmacs"] <= res.baseline["macs"] / 1e6 for rec in res.logbook)
    # every evaluated cost is a predicted latency in ms, not a MAC count
    assert all(0 < c < 10 * res.baseline["latency_ms"] for s, c in res.evaluated[0])
    from evoprune.evolve.report import pareto_axes
    ax = pareto_axes(res)
    assert ax.get_xlabel().startswith("predicted latency (ms")
    xs = [x for coll in ax.collections for x, _ in coll.get_offsets()]
    assert xs and max(xs) < 10 * res.baseline["latency_ms"]  # plotted in ms, not MMACs


def test_a_deap_user_gets_latency_as_an_objective(table):
    model, space, tab = table
    x, y = torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,))
    ev = Evaluator(model, space, x, y, config=_no_recal(), latency=tab)
    budget = 0.5 * tab.base_ms
    tb = register(base.Toolbox(), space, ev, latency=tab, latency_budget=budget, seed=0)
    pop = tb.population(6)
    for ind in pop:
        assert tab.predict_genes(ind) <= budget
        ind.fitness.values = tb.evaluate(ind)
        assert ind.fitness.values[1] == pytest.approx(tab.predict_genes(ind))
    nsga = register(base.Toolbox(), space, ev, objective="nsga2", latency=tab, seed=0)
    assert len(nsga.select(pop, 3)) == 3
    with pytest.raises(ConfigError, match="latency_budget needs latency"):
        register(base.Toolbox(), space, ev, latency_budget=1.0)
    other = PruningSpace.from_model(model, torch.randn(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="another pruning space"):
        register(base.Toolbox(), other, ev, latency=tab, latency_budget=1.0)


def test_knapsack_and_level_switch_work_in_predicted_milliseconds(table):
    """Under a latency budget the knapsack allocates and the level-switch trades width at equal predicted ms, on
    the widths the table times (multiples of round_to)."""
    model, space, tab = table
    budget = 0.5 * tab.base_ms
    tb = register(base.Toolbox(), space, lambda ind: (0.0, 0.0), latency=tab, latency_budget=budget, seed=0)
    ind = tb.knapsack()
    counts = space.layout.kept_counts(ind)
    assert tab.predict_genes(ind) <= budget
    assert all(c % 8 == 0 or c == g.size for c, g in zip(counts, space.groups))
    for parent in tb.population(6):
        (child,) = tb.mutate(tb.clone(parent))
        assert tab.predict_genes(child) <= budget


# ------------------------------------------------------------------------------------------------ command line

@pytest.mark.slow
def test_prune_with_a_latency_target_from_the_command_line(imagefolder, tmp_path, capsys, monkeypatch):
    from evoprune.cli.commands import main
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))
    argv = ["prune", "--arch", "tiny", "--data", str(imagefolder), "--out", str(tmp_path / "run"),
            "--baseline-epochs", "1", "--score-samples", "20", "--population", "4", "--elites", "2",
            "--generations", "1", "--rounds", "2", "--recal-batches", "1", "--finetune-epochs", "0",
            "--latency-batch", "4"]
    target = 0.03
    code = main(argv + ["--target-latency-ms", str(target)])
    out, err = capsys.readouterr()
    floor = re.search(r"ask for at least ([\d.]+) ms", err)
    if code == 2 and floor:  # a slower or loaded machine: the smallest legal plan times above 0.03 ms
        target = round(1.1 * float(floor.group(1)), 5)
        code = main(argv + ["--target-latency-ms", str(target), "--no-resume"])
        out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["cost"] == "ms" and report["baseline"]["latency_batch"] == 4
    for r in report["rows"]:
        assert r["latency_ms"] > 0 and r["latency_batch_ms"] > 0
        # the chosen plan meets the round's budget, unless no plan of the round did: then it is the least over it
        # (the tiny CNN at --latency-batch 4 times in ~0.05 ms, and with widths snapped to 16 channels the repair,
        # which moves widths only, cannot always reach a budget that needs a cut unit)
        feasible = [g["feasible"] for g in report["logbook"] if g["round"] == r["round"]]
        assert r["predicted_ms"] <= r["budget"] * 1.0001 or feasible[-1] == 0, (r, feasible)
    assert report["rows"][-1]["budget"] == pytest.approx(target)
    assert "latency (ms, batch 4)" in (tmp_path / "run" / "report.md").read_text()
    assert list((tmp_path / "cache" / "latency").glob("onnxruntime-*.json"))  # measured once per round, cached


@pytest.mark.parametrize("extra, message", [
    (["--target-latency-ms", "0"], "--target-latency-ms must be a latency in ms > 0"),
    (["--target-latency-ms", "0.00001"], "--target-latency-ms 1e-05 ms is below what the smallest legal plan"),
    (["--target-latency-ms", "1", "--threads", "0"], "--threads must be an int >= 1"),
])
def test_bad_latency_flags_exit_2_naming_the_flag(imagefolder, tmp_path, capsys, monkeypatch, extra, message):
    from evoprune.cli.commands import main
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))
    code = main(["prune", "--arch", "tiny", "--data", str(imagefolder), "--out", str(tmp_path / "run"),
                 "--baseline-epochs", "1", *extra])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "report.json").exists()


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory, write_imagefolder):
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"), 120, 60, classes=4, size=16)


@pytest.mark.slow
def test_latency_search_without_snapping_warns_that_predictions_assume_snapped_widths(tmp_path):
    x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))
    with pytest.warns(LatencyWarning, match="snap=False: widths off multiples of"), \
            pytest.raises(ConfigError, match="below what the smallest legal plan"):
        search(net(), X, x, y, target_kind="latency", target=1e-5, snap=False, fitness=_no_recal(),
               reconstruct="none", verbose=False, latency_cache=str(tmp_path))
