"""Engines behind ``toolbox.map`` (evoprune.evolve.engines): the same search gives the same plans and scores under every
engine; Dask survives a worker killed mid-generation, reports fitness errors with the plan and the worker's
traceback, refuses a worker of another version and an unreachable scheduler; bad engine settings fail before any
work."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from evoprune.evolve import checkpoint as ckpt
from evoprune.evolve import engines
from evoprune.data import normalize, synthetic
from evoprune.evolve.engines import DaskMap, ProcessMap, make_map
from evoprune.errors import ConfigError, EngineError, EvaluationError
from evoprune.evolve import search
from evoprune.evolve.fitness import Evaluator, FitnessConfig
from evoprune.models import tiny_cnn
from evoprune.space.pruning_space import PruningSpace
from evoprune.train import train

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "jobs" / "tiny_search.py"
HAVE_DASK = importlib.util.find_spec("distributed") is not None
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="pip install 'evoprune[dask]' (CI installs it with [dev])")
# workers use one torch thread; so does this process, so that in-process scores are the same floats as theirs
pytestmark = pytest.mark.usefixtures("torch_single_thread")


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), EVOPRUNE_PROGRESS="0")


@pytest.fixture(scope="module")
def tiny():
    """A trained tiny CNN, its scoring data and BN batches."""
    torch.manual_seed(0)
    data = synthetic(600, 200, classes=4, size=16, seed=0)
    model = tiny_cnn(4, 16)
    train(model, data.train, 1, batch_size=64, lr=0.05, progress=False, seed=0)
    model.eval()
    x, y = normalize(data.val.images), data.val.labels
    recal = [normalize(data.train.images[i:i + 64]) for i in range(0, 128, 64)]
    return model, x, y, recal


def small_search(tiny, trace_dir=None, **kwargs):
    """A 1-round search ranked by the loss: a continuous score, so that the last-bit float differences between
    processes (kernels can round differently with another memory alignment) cannot flip a top-1 tie."""
    model, x, y, recal = tiny
    return search(model, x[:1], x, y, recal_x=recal, rounds=1, generations=2, population=8, elites=3, target=0.4,
                  seed=3, verbose=False, progress=False, fitness=FitnessConfig(metric="loss", trace_dir=trace_dir),
                  **kwargs)


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("kwargs, setting, match", [
    (dict(executor="threads"), "executor", "serial, scoop, processes, dask"),
    (dict(executor="processes", scheduler="tcp://1.2.3.4:8786"), "scheduler", "dask"),
    (dict(executor="processes", workers=0), "workers", ">= 1"),
    (dict(executor="scoop"), "executor", "python -m scoop"),
])
def test_bad_engine_settings_are_refused_before_any_work(kwargs, setting, match):
    with pytest.raises(ConfigError, match=match) as err:
        make_map(**kwargs)
    assert err.value.setting == setting


def test_dask_without_the_extra_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"evoprune\[dask\]") as err:
        make_map("dask")
    assert err.value.setting == "executor"


def test_the_default_is_the_builtin_map_outside_scoop():
    assert make_map() is map and make_map("serial") is map


# ------------------------------------------------------------------------------------------ equivalence
@pytest.mark.slow
def test_every_engine_gives_the_serial_plans_and_scores(tmp_path):
    """The tiny search job, same seed: serial, processes (2), Dask (LocalCluster, 2 workers), SCOOP (-n 2)."""
    runs = {"serial": [], "processes": ["--executor", "processes", "--workers", "2"],
            "scoop": None, "dask": ["--executor", "dask", "--workers", "2"]}
    if not HAVE_DASK:
        del runs["dask"]
    results = {}
    for name, flags in runs.items():
        out = tmp_path / name
        if name != "serial":
            out.mkdir()
            (out / "weights.pt").write_bytes((tmp_path / "serial" / "weights.pt").read_bytes())
        cmd = [sys.executable, "-m", "scoop", "-n", "2", str(JOB), str(out)] if flags is None else \
            [sys.executable, str(JOB), str(out), *flags]
        r = subprocess.run(cmd + ["--no-checkpoint", "--generations", "2"], env=env(), capture_output=True,
                           text=True, timeout=600)
        # python -m scoop exits 0 even when the script fails: trust the result file and the done line
        assert r.returncode == 0 and "tiny_search: done" in r.stderr, (name, r.stderr[-3000:])
        results[name] = json.loads((out / "result.json").read_text())
    for name, res in results.items():
        assert res["plans"] == results["serial"]["plans"], name
        assert res["scores"] == pytest.approx(results["serial"]["scores"], abs=1e-9), name
        assert [row["best"] for row in res["logbook"]] == [row["best"] for row in results["serial"]["logbook"]], name


@pytest.mark.slow
def test_a_process_pool_receives_each_round_state_once(tiny):
    model, x, y, recal = tiny
    space = PruningSpace.from_model(model, x[:1])
    genes = [1] * len(space)
    loss = FitnessConfig(metric="loss")  # continuous: compared across processes to float precision
    with ProcessMap(2) as pmap:
        a = Evaluator(model, space, x, y, recal, loss)
        first = list(pmap(a, [genes, genes]))
        pool = pmap._pool
        (again,) = pmap(a, [genes])
        assert again == pytest.approx(first[0]) and pmap._pool is pool  # same state: same pool
        a.release()
        b = Evaluator(model, space, x[:100], y[:100], recal, loss)
        list(pmap(b, [genes]))
        assert pmap._pool is not pool and b.token in pmap._tokens and a.token not in pmap._tokens  # a new pool
        b.release()
    here = Evaluator(model, space, x, y, recal, loss)
    assert first[0] == pytest.approx(here(genes), rel=1e-5)
    here.release()


# ------------------------------------------------------------------------------------------ Dask
def _slow_scoring(seconds):
    """Run in Dask workers: make every fitness call take ``seconds`` longer (to kill a worker mid-map)."""
    from evoprune.evolve import fitness
    score = fitness._Worker._score_plan
    if getattr(score, "slowed", False):
        return
    def slow(self, plan, macs, data):
        time.sleep(seconds)
        return score(self, plan, macs, data)
    slow.slowed = True
    fitness._Worker._score_plan = slow


def _failing_scoring():
    from evoprune.evolve import fitness
    def fail(self, plan, macs, data):
        raise RuntimeError("injected worker failure")
    fitness._Worker._score_plan = fail


def _pretend_version(version):
    from evoprune import _version
    _version.__version__ = version


@pytest.fixture
def dask_map():
    import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the helpers above, for the workers
    with DaskMap(workers=2) as m:
        yield m


@needs_dask
@pytest.mark.slow
def test_a_worker_killed_mid_generation_is_replaced_and_nothing_is_scored_twice(tiny, dask_map, tmp_path):
    serial = small_search(tiny)
    dask_map.client.run(_slow_scoring, 0.25)
    pids = sorted(dask_map.client.run(os.getpid).values())
    trace = tmp_path / "trace"
    trace.mkdir()
    killed = []

    def kill_in_generation_1():  # the initial population is 8 calls; kill during the next map
        deadline = time.time() + 120
        while time.time() < deadline:
            lines = sum(len(p.read_text().splitlines()) for p in trace.glob("evals-*.log"))
            if lines >= 10:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)
    killer = threading.Thread(target=kill_in_generation_1)
    killer.start()
    result = small_search(tiny, map=dask_map, checkpoint_dir=str(tmp_path / "ck"), trace_dir=str(trace))
    killer.join()
    assert killed, "the worker was never killed: the test did not exercise a failure"
    assert pids[0] not in dask_map.client.run(os.getpid).values()
    # the generation completed; every individual got one score, the one the serial run gives it
    assert result.plans == serial.plans
    assert [r["search_score"] for r in result.rows] == pytest.approx([r["search_score"] for r in serial.rows],
                                                                      rel=1e-5)
    assert [row["evals"] for row in result.logbook] == [row["evals"] for row in serial.logbook]
    assert len(result.evaluated[0]) == sum(row["evals"] for row in result.logbook)
    state = torch.load(tmp_path / "ck" / ckpt.FILENAME, weights_only=True)  # consistent with what was returned
    assert state["plans"] == result.plans and state["generation"] is None and state["round"] == 2
    assert [tuple(p) for p in state["evaluated"][0]] == [tuple(p) for p in result.evaluated[0]]


@needs_dask
@pytest.mark.slow
def test_a_fitness_error_in_a_worker_names_the_plan_and_the_worker_traceback(tiny, dask_map):
    dask_map.client.run(_failing_scoring)
    with pytest.raises(EvaluationError) as err:
        small_search(tiny, map=dask_map)
    message = str(err.value)
    assert "fitness failed for plan [" in message and "injected worker failure" in message
    assert "Traceback" in message and f"process {os.getpid()}" not in message  # the worker's, not ours


@needs_dask
@pytest.mark.slow
def test_dask_publishes_the_state_once_and_a_worker_of_another_version_is_refused(tiny, dask_map):
    model, x, y, recal = tiny
    space = PruningSpace.from_model(model, x[:1])
    ev = Evaluator(model, space, x, y, recal)
    genes = [1] * len(space)
    assert len(__import__("pickle").dumps(ev)) < 2000  # tasks carry the token, not the model
    list(dask_map(ev, [genes] * 4))
    future = dask_map._futures[ev.token]
    list(dask_map(ev, [genes] * 4))
    assert dask_map._futures[ev.token] is future  # scattered once, not once per task or per map
    assert len(dask_map.client.who_has(future)[future.key]) == 2  # on both workers
    ev.release()
    list(dask_map(map, []))
    assert ev.token not in dask_map._futures  # released with the evaluator
    dask_map.client.run(_pretend_version, "0.0.0-other")
    with pytest.raises(EngineError, match=r"0\.0\.0-other.*evoprune " + engines.__version__.replace(".", r"\.")):
        dask_map.check_versions()


@pytest.mark.slow
@needs_dask
def test_an_unreachable_scheduler_fails_fast_with_its_address():
    t0 = time.perf_counter()
    with pytest.raises(EngineError, match=r"tcp://127\.0\.0\.1:9\b"):
        make_map("dask", scheduler="tcp://127.0.0.1:9")
    assert time.perf_counter() - t0 < 30
