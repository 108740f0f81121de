"""The search: beats random plans, reports per round, validates its settings, resumes after SIGKILL, runs on SCOOP."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from deap import algorithms, base, tools

from evoprune import CheckpointError, ConfigError, PruningSpace
from evoprune.evolve import checkpoint as ckpt
from evoprune.evolve import operators as ops
from evoprune.data import normalize
from evoprune.evolve.fitness import Evaluator
from evoprune.space.importance import ranks as to_ranks
from evoprune.evolve import search
from evoprune.evolve.engines import default_map
from evoprune.evolve.toolbox import creator_types, register

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "jobs" / "tiny_search.py"


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def trained(trained_tiny):
    """A tiny CNN trained on generated, separable-but-noisy data; a search split and BN re-calibration batches."""
    model, data = trained_tiny(2000, 1000, data_seed=0, epochs=4)
    search_set, report_set = data.val.stratified_split(0.5, seed=0)
    x, y = normalize(search_set.images), search_set.labels
    recal = [normalize(data.train.images[i:i + 64]) for i in range(0, 640, 64)]
    return model, x, y, recal, report_set


@pytest.mark.slow
def test_ga_beats_the_mean_of_random_plans_at_the_same_budget(trained):
    model, x, y, recal, _ = trained
    space = PruningSpace.from_model(model, x[:1])
    budget = 0.15 * space.base_macs
    evaluator = Evaluator(model, space, x, y, recal)
    _, ind_cls = creator_types()
    random.seed(0)
    rng = np.random.default_rng(0)
    random_ranks = [to_ranks({"g": rng.random(g.size)})["g"] for g in space.groups]
    random_scores = []
    for _ in range(20):
        ind = ops.init_random(ind_cls, space.layout, (0.2, 1.0))
        ops.repair(ind, space, random_ranks, macs_budget=budget)
        assert space.cost_of(ind)[0] <= budget
        random_scores.append(evaluator(ind)[0])
    result = search(model, x[:1], x, y, recal_x=recal, rounds=1, generations=5, population=16, elites=4,
                    target=0.15, seed=0, verbose=False, progress=False)
    row = result.rows[0]
    assert row["macs"] <= budget
    assert row["search_score"] >= np.mean(random_scores) + 0.25, (row["search_score"], random_scores)
    assert row["search_score"] >= max(random_scores)


@pytest.mark.slow
def test_search_rows_widths_front_and_logbook(trained, tmp_path):
    model, x, y, recal, report_set = trained
    from evoprune.train import evaluate
    seen = []
    result = search(model, x[:1], x, y, recal_x=recal, report=lambda m: evaluate(m, report_set), rounds=2,
                    generations=2, population=8, elites=3, target=0.3, seed=1, verbose=False, progress=False,
                    on_round=lambda k, m, row, plan: seen.append((k, row["macs"])))
    assert [r["round"] for r in result.rows] == [1, 2]
    assert [k for k, _ in seen] == [1, 2]
    base = result.baseline
    for r in result.rows:
        assert {"params", "size_mb", "top1", "reduction_pct", "macs", "time_s"} <= set(r)
        assert 0 <= r["top1"] <= 1 and r["time_s"] > 0
        assert r["macs"] <= r["budget"] + 1e-6
    assert base["macs"] > result.rows[0]["macs"] >= result.rows[1]["macs"]
    assert result.rows[1]["macs"] <= 0.3 * base["macs"]
    assert len(result.widths) == 3 and set(result.widths[0]) == set(result.widths[2])
    assert all(result.widths[2][k] <= result.widths[0][k] for k in result.widths[0])
    assert len(result.pareto) == 2 and all(result.pareto)
    gens = [(rec["round"], rec["gen"]) for rec in result.logbook]
    assert gens == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert all({"evals", "best", "median", "best_mmacs", "hv"} <= set(rec) for rec in result.logbook)
    assert "| round |" in result.table() and "features.0" in result.widths_table()


@pytest.mark.parametrize("bad, match", [
    (dict(population=1), "population"), (dict(elites=31), "elites"), (dict(elites=0), "elites"),
    (dict(rounds=0), "rounds"), (dict(generations=0), "generations"), (dict(target=0.0), "target"),
    (dict(target=1.5), "target"), (dict(p_c=1.2), "p_c"), (dict(p_mut=-0.1), "p_mut"),
    (dict(objective="best"), "objective"), (dict(nonsense=1), "unknown search setting"),
])
def test_bad_settings_are_refused_before_any_work(bad, match, monkeypatch):
    called = []
    monkeypatch.setattr(PruningSpace, "from_model", classmethod(lambda *a, **k: called.append(1)))
    with pytest.raises(ConfigError, match=match):
        search(torch.nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
               **bad)
    assert not called


def test_a_child_crossed_then_mutated_is_repaired_once(trained, monkeypatch):
    from evoprune.evolve import operators as ops
    model, x, y, recal, _ = trained
    space = PruningSpace.from_model(model, x[:1])
    toolbox = register(base.Toolbox(), space, lambda ind: (0.0, 0.0), macs_budget=0.5 * space.base_macs, seed=0)
    parents = [toolbox.individual() for _ in range(2)]
    calls = []
    real = ops.repair
    monkeypatch.setattr(ops, "repair", lambda ind, *a, **k: calls.append(id(ind)) or real(ind, *a, **k))
    a, b = toolbox.mate(*map(toolbox.clone, parents))
    assert calls == [] and a.repair_pending and b.repair_pending  # deferred
    toolbox.mutate(a)
    assert calls == [id(a)] and not getattr(a, "repair_pending", False)
    list(toolbox.map(toolbox.evaluate, [a, b]))  # b, crossed only, is repaired before it is scored
    assert calls == [id(a), id(b)]
    assert all(space.cost_of(c)[0] <= 0.5 * space.base_macs for c in (a, b))


def test_stock_deap_eaMuPlusLambda_runs_with_the_registered_toolbox(trained):
    model, x, y, recal, _ = trained
    space = PruningSpace.from_model(model, x[:1])
    evaluator = Evaluator(model, space, x[:200], y[:200], recal[:2])
    toolbox = register(base.Toolbox(), space, evaluator, objective="nsga2", seed=0)
    assert toolbox.map.func.__wrapped__ is map  # not launched with python -m scoop (wrapped: it repairs first)
    pop = toolbox.population(8)
    front = tools.ParetoFront()
    stats = tools.Statistics(lambda ind: ind.fitness.values[0])
    stats.register("max", np.max)
    pop, log = algorithms.eaMuPlusLambda(pop, toolbox, mu=8, lambda_=8, cxpb=1 - toolbox.p_mut, mutpb=toolbox.p_mut,
                                         ngen=2,
                                         stats=stats, halloffame=front, verbose=False)
    assert len(pop) == 8 and len(log) == 3 and len(front) >= 1
    assert all(ind.fitness.valid and len(ind) == len(space) for ind in pop)
    # varOr only crosses or mutates: the crossed children were repaired by map before scoring
    assert not any(getattr(ind, "repair_pending", False) for ind in pop)
    assert all(toolbox.evaluate(toolbox.clone(ind)) == ind.fitness.values for ind in pop[:3])
    values = [ind.fitness.values for ind in front]
    assert all(0 <= s <= 1 and 0 < m <= space.base_macs for s, m in values)


@pytest.mark.slow
@pytest.mark.parametrize("space_kwargs", [{"connections": False}, {"min_keep": 2, "round_to": 2}])
def test_resume_after_a_finished_round_keeps_non_default_space_options(trained, tmp_path, space_kwargs):
    """A resumed run rebuilds the finished rounds' models with the run's own space options (it used the defaults,
    and then refused its own plans as 'made for another pruning space')."""
    model, x, y, recal, _ = trained
    connections = space_kwargs.pop("connections", True)
    kwargs = dict(recal_x=recal[:2], rounds=2, generations=1, population=4, elites=2, target=0.4, seed=3,
                  connections=connections, space_kwargs=space_kwargs, checkpoint_dir=str(tmp_path),
                  verbose=False, progress=False)
    first = search(model, x[:1], x[:200], y[:200], **kwargs)
    again = search(model, x[:1], x[:200], y[:200], **kwargs)  # resumes the finished search
    assert again.plans == first.plans and again.rows == first.rows
    assert {k: v.shape for k, v in again.model.state_dict().items()} == \
        {k: v.shape for k, v in first.model.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                  first.model.state_dict().values()))


def test_logbook_hypervolume_and_scores_under_the_loss_metric(trained):
    """Scores are minus a loss under metric="loss"; the hypervolume is measured from the chance-level loss, so it
    is positive whenever a plan beats chance (it was always 0)."""
    from evoprune.evolve.fitness import FitnessConfig
    model, x, y, recal, _ = trained
    result = search(model, x[:1], x[:200], y[:200], recal_x=recal[:2], rounds=1, generations=1, population=6,
                    elites=2, target=0.5, seed=0, fitness=FitnessConfig(metric="loss"), verbose=False,
                    progress=False)
    scores = [s for s, _ in result.evaluated[0]]
    assert all(s < 0 for s in scores)
    assert max(scores) > -np.log(4)  # a 4-class model pruned to half its MACs beats chance
    assert all(rec["hv"] > 0 for rec in result.logbook)


def test_hypervolume_is_measured_from_the_metric_reference_point():
    from evoprune.evolve.loop import hypervolume
    from evoprune.evolve.fitness import WORST_SCORE, reference_score
    _, ind_cls = creator_types()

    def ind(score, macs):
        i = ind_cls([1])
        i.fitness.values = (score, macs)
        return i
    ref = reference_score("loss", 4)
    assert ref == pytest.approx(-np.log(4))
    # one plan at loss 0.5 and half the MACs dominates the box (ln 4 - 0.5) x (1 - 0.5)
    assert hypervolume([ind(-0.5, 50.0)], 100.0, ref) == pytest.approx((np.log(4) - 0.5) * 0.5)
    # a plan worse than chance, a crashed plan and a full-size plan add nothing
    assert hypervolume([ind(-0.5, 50.0), ind(-3.0, 10.0), ind(WORST_SCORE, 100.0), ind(-0.1, 100.0)], 100.0,
                       ref) == pytest.approx((np.log(4) - 0.5) * 0.5)
    assert hypervolume([ind(0.8, 25.0)], 100.0, reference_score("top1", 4)) == pytest.approx(0.8 * 0.75)


def test_toolbox_population_is_repaired_into_the_budget(trained):
    """A DEAP user calling toolbox.population() gets individuals inside the budget, as offspring are."""
    model, x, y, _, _ = trained
    space = PruningSpace.from_model(model, x[:1], min_keep=2, round_to=2)
    for objective in ("budget", "nsga2"):
        toolbox = register(base.Toolbox(), space, lambda ind: (0.0, 0.0), objective=objective,
                           macs_budget=0.3 * space.base_macs, init="random", seed=1)
        pop = toolbox.population(12)
        for ind in pop:
            assert space.cost_of(ind)[0] <= 0.3 * space.base_macs
            counts = space.layout.kept_counts(ind)
            assert all(c >= 2 and (c % 2 == 0 or c == g.size) for c, g in zip(counts, space.groups))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "init"])
def test_baselines_get_the_ga_evaluation_budget_and_respect_the_target(trained, method):
    """random search and the initial population alone: as many plans as the GA may evaluate, one logbook entry,
    a plan within the target, ranked by the same fitness."""
    from evoprune.evolve import SearchConfig
    model, x, y, recal, _ = trained
    kwargs = dict(recal_x=recal[:2], rounds=1, generations=2, population=6, elites=2, target=0.4, seed=0,
                  verbose=False, progress=False)
    budget = SearchConfig(generations=2, population=6, elites=2).evaluations()
    assert budget == 6 + 2 * (6 - 2)
    base = search(model, x[:1], x[:200], y[:200], **kwargs)
    other = search(model, x[:1], x[:200], y[:200], method=method, **kwargs)
    assert [rec["gen"] for rec in other.logbook] == [0]
    assert budget - 3 <= other.rows[0]["evaluations"] <= budget  # distinct plans only (a repeat is not rescored)
    assert base.rows[0]["evaluations"] <= budget
    assert other.rows[0]["macs"] <= 0.4 * other.baseline["macs"] + 1e-6
    assert other.rows[0]["search_score"] == max(s for s, m in other.evaluated[0] if m <= 0.4 * other.baseline["macs"])


def test_unknown_method_is_refused():
    with pytest.raises(ConfigError, match="method"):
        search(torch.nn.Linear(2, 2), torch.zeros(1, 2), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
               method="anneal")


def test_search_output_in_a_log_has_no_terminal_escapes(trained, capfd, monkeypatch):
    """With stderr not a terminal (a log file), the search writes its logbook lines and round summary as plain
    lines: no progress-bar redraws, no \\r or escape sequences, nothing on stdout."""
    monkeypatch.delenv("EVOPRUNE_PROGRESS", raising=False)
    model, x, y, recal, _ = trained
    search(model, x[:1], x[:200], y[:200], recal_x=recal[:2], rounds=1, generations=1, population=4, elites=2,
           target=0.5, seed=0, verbose=True, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert any(line.split()[:3] == ["round", "gen", "evals"] for line in lines)  # the logbook header
    assert sum(line.split()[:2] in (["1", "0"], ["1", "1"]) for line in lines) == 2  # one line per generation
    assert "evoprune: round 1:" in err


def test_register_and_search_share_their_defaults():
    """One default per setting: objective 'budget' and 4 generations, in register, search and the jobs."""
    import inspect
    from evoprune.evolve import SearchConfig
    from evoprune.cli.job import JobOptions
    assert inspect.signature(register).parameters["objective"].default == SearchConfig.objective == "budget"
    assert JobOptions().generations == SearchConfig().generations
    assert JobOptions().objective == SearchConfig().objective


def test_creator_types_are_created_once():
    f1, i1 = creator_types()
    f2, i2 = creator_types()
    assert f1 is f2 and i1 is i2 and f1.weights == (1.0, -1.0)
    assert issubclass(i1, list)
    assert default_map() is map


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_refuses_truncated_foreign_and_mismatched_files(tmp_path):
    state = {"fingerprint": "abc", "settings": {"rounds": 2}, "round": 1}
    path = ckpt.save(tmp_path, state)
    assert ckpt.load(tmp_path, fingerprint="abc", settings={"rounds": 2})["round"] == 1
    with pytest.raises(CheckpointError, match="another model"):
        ckpt.load(tmp_path, fingerprint="xyz", settings={"rounds": 2})
    with pytest.raises(CheckpointError, match="rounds"):
        ckpt.load(tmp_path, fingerprint="abc", settings={"rounds": 3})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.load(tmp_path, fingerprint="abc", settings={"rounds": 2})
    torch.save({"format": ckpt.FORMAT, "evoprune_version": "0.0.1", **state}, path)
    with pytest.raises(CheckpointError, match="0.0.1"):
        ckpt.load(tmp_path, fingerprint="abc", settings={"rounds": 2})


def test_rng_state_round_trips():
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    saved = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_result(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = _run([str(JOB), str(ref), "--no-checkpoint", "--generations", "6"])
    assert r.returncode == 0, r.stderr
    killed.mkdir()
    shutil.copy(ref / "weights.pt", killed / "weights.pt")
    rng = random.Random(1234)
    kills = 0
    state_file = killed / "checkpoint" / ckpt.FILENAME
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, str(JOB), str(killed), "--generations", "6"], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill at a random point: after 1-3 more generations were checkpointed, plus a random delay
        for _ in range(rng.randint(1, 3)):
            before = state_file.stat().st_mtime_ns if state_file.exists() else 0
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline and \
                    (state_file.stat().st_mtime_ns if state_file.exists() else 0) == before:
                time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break  # finished before we could kill it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 3, "the job finished too fast to be killed three times"
    assert (killed / "checkpoint" / ckpt.FILENAME).exists()
    assert not (killed / "result.json").exists()
    r = _run([str(JOB), str(killed), "--generations", "6"])
    assert r.returncode == 0, r.stderr
    want = json.loads((ref / "result.json").read_text())
    got = json.loads((killed / "result.json").read_text())
    assert got["plans"] == want["plans"]
    assert got["logbook"] == want["logbook"]
    assert got["scores"] == want["scores"] and got["macs"] == want["macs"]


@pytest.mark.slow
def test_scoop_two_workers_evaluate_and_match_the_serial_run(tmp_path):
    serial, par = tmp_path / "serial", tmp_path / "scoop"
    r = _run([str(JOB), str(serial), "--no-checkpoint", "--rounds", "1", "--generations", "3"])
    assert r.returncode == 0, r.stderr
    par.mkdir()
    shutil.copy(serial / "weights.pt", par / "weights.pt")
    r = _run(["-m", "scoop", "-n", "2", str(JOB), str(par), "--no-checkpoint", "--rounds", "1",
              "--generations", "3", "--trace"])
    output = r.stdout + r.stderr
    # python -m scoop exits 0 even when the script fails: check the output and the files, not just the code
    assert r.returncode == 0 and "Traceback" not in output and "tiny_search: done" in output, output[-3000:]
    logs = list((par / "trace").glob("evals-*.log"))
    pids = {line.split()[0] for log in logs for line in log.read_text().splitlines()}
    assert len(pids) >= 2, f"evaluations came from {pids}"
    assert os.getpid() not in {int(p) for p in pids}
    want = json.loads((serial / "result.json").read_text())
    got = json.loads((par / "result.json").read_text())
    assert got["plans"] == want["plans"] and got["scores"] == want["scores"]


@pytest.mark.slow
def test_a_worker_failure_under_scoop_names_the_plan_and_keeps_the_checkpoint(tmp_path):
    ok = tmp_path / "ok"
    r = _run([str(JOB), str(ok), "--rounds", "1", "--generations", "1"])
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(ok / "weights.pt", bad / "weights.pt")
    env = _env()
    env["TINY_SEARCH_FAIL_AFTER"] = "10"  # generation 0 has 10 evaluations: the failure comes in a later one
    r = subprocess.run([sys.executable, "-m", "scoop", "-n", "2", str(JOB), str(bad), "--rounds", "1",
                        "--generations", "3"], env=env, capture_output=True, text=True, timeout=600)
    output = r.stdout + r.stderr
    assert "EvaluationError" in output and "fitness failed for plan [features.0=" in output, output[-3000:]
    assert "injected failure" in output
    assert "tiny_search: done" not in output and not (bad / "result.json").exists()
    state = torch.load(bad / "checkpoint" / ckpt.FILENAME, weights_only=True)  # the last checkpoint is intact
    assert state["round"] == 1 and state["generation"] >= 0 and len(state["population"]) == 10


def test_the_public_face_has_what_the_readme_and_examples_use():
    """What users reach for is importable from ``evoprune`` itself and is the same object as in its module;
    ``Round`` (a round's internal state) left the public face with a DeprecationWarning."""
    import evoprune
    from evoprune.prune import bn
    from evoprune.evolve import engines
    from evoprune import errors
    from evoprune.space import importance
    from evoprune.deploy import latency, runtime
    assert (evoprune.EngineError, evoprune.LatencyWarning, evoprune.LatencyTable, evoprune.channel_importance,
            evoprune.recalibrate_bn, evoprune.make_map, evoprune.opened) == (
        errors.EngineError, runtime.LatencyWarning, latency.LatencyTable, importance.channel_importance,
        bn.recalibrate_bn, engines.make_map, engines.opened)
    assert set(evoprune.__all__) <= set(dir(evoprune)) and "Round" not in evoprune.__all__
    with pytest.warns(DeprecationWarning, match="evoprune.evolve.round"):
        from evoprune.evolve.round import Round
        assert evoprune.Round is Round
    with pytest.raises(AttributeError):
        evoprune.NoSuchThing
