"""Fitness: adaptive BN helps, masked and physical scoring agree, caching, failure policies, small pickles."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch

from evoprune import ConfigError, ModelError, PlanError, PruningSpace
from evoprune.evolve import fitness as fit
from evoprune.data import normalize
from evoprune.errors import EvaluationError
from evoprune.evolve.fitness import Evaluator, FitnessConfig
from evoprune.space.importance import channel_importance


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def setup(trained_tiny):
    model, data = trained_tiny(1600, 600, data_seed=1, epochs=3)
    x, y = normalize(data.val.images), data.val.labels
    recal = [normalize(data.train.images[i:i + 64]) for i in range(0, 512, 64)]
    space = PruningSpace.from_model(model, x[:1])
    imp = channel_importance(model, space, x[:1], "l1")
    return model, space, imp, x, y, recal


def uniform(space, imp, keep, cut=()):
    """Keep the top ``keep`` fraction of every group by L1 (the torch-pruning one-liner's plan)."""
    genes = []
    for g in space.groups:
        k = max(1, round(keep * g.size))
        top = set(np.argsort(-imp[g.name])[:k].tolist())
        genes += [int(i in top) for i in range(g.size)]
    genes += [0 if u.name in cut else 1 for u in space.units]
    return genes


@pytest.mark.slow
def test_bn_recalibration_raises_the_quick_score_of_a_pruned_model(setup):
    model, space, imp, x, y, recal = setup
    ind = uniform(space, imp, 0.35)
    plain = Evaluator(model, space, x, y, config=FitnessConfig(bn_recalibration=False))
    adaptive = Evaluator(model, space, x, y, recal)
    full = Evaluator(model, space, x, y, config=FitnessConfig(bn_recalibration=False))(space.layout.ones())[0]
    s_plain, s_adaptive = plain(ind)[0], adaptive(ind)[0]
    assert s_adaptive > s_plain + 0.05, (s_plain, s_adaptive, full)


@pytest.mark.parametrize("keep, cut", [(0.9, ()), (0.5, ("features.3",)), (0.3, ("features.10",))])
def test_masked_and_physical_scoring_agree(setup, keep, cut):
    model, space, imp, x, y, recal = setup
    ind = uniform(space, imp, keep, cut)
    scores = {}
    for mode in ("masked", "physical"):
        ev = Evaluator(model, space, x, y, recal, FitnessConfig(metric="loss", mode=mode))
        scores[mode] = ev(ind)
    assert scores["masked"][1] == scores["physical"][1]  # same analytic MACs
    assert scores["masked"][0] == pytest.approx(scores["physical"][0], abs=1e-4)


def test_scoring_leaves_the_model_untouched(setup, state_guard):
    model, space, imp, x, y, recal = setup
    check = state_guard(model)
    ev = Evaluator(model, space, x, y, recal, FitnessConfig(mode="masked"))
    ev(uniform(space, imp, 0.5, ("features.3",)))
    check()


def test_genomes_already_seen_are_not_scored_again(setup, monkeypatch):
    model, space, imp, x, y, recal = setup
    ev = Evaluator(model, space, x, y, recal)
    ind = uniform(space, imp, 0.6)
    first = ev(ind)
    calls = []
    monkeypatch.setattr(fit._Worker, "_score_plan", lambda *a: calls.append(1) or (0.0, 0.0))
    assert ev(list(ind)) == first and not calls


def test_a_failing_fitness_call_fails_fast_naming_the_plan(setup, monkeypatch):
    model, space, imp, x, y, recal = setup
    ev = Evaluator(model, space, x, y, recal)

    def boom(self, plan, macs, data):
        raise RuntimeError("kaboom")
    monkeypatch.setattr(fit._Worker, "_score_plan", boom)
    with pytest.raises(EvaluationError) as err:
        ev(uniform(space, imp, 0.7))
    msg = str(err.value)
    assert "features.0=" in msg and "kaboom" in msg and "Traceback" in msg and "process" in msg


def test_nan_loss_fails_fast_or_scores_worst_by_policy(setup, monkeypatch):
    model, space, imp, x, y, recal = setup
    monkeypatch.setattr(fit._Worker, "_score_plan", lambda self, plan, macs, data: (0.5, float("nan")))
    with pytest.raises(EvaluationError, match="nan"):
        Evaluator(model, space, x, y, recal)(uniform(space, imp, 0.8))
    lenient = Evaluator(model, space, x, y, recal, FitnessConfig(on_error="worst"))
    with pytest.warns(UserWarning, match="scored as worst"):
        score, macs = lenient(uniform(space, imp, 0.8))
    assert score == fit.WORST_SCORE and macs == space.base_macs


@pytest.mark.parametrize("metric", ["top1", "loss"])
def test_a_failed_plan_scores_below_every_real_plan_and_never_wins_a_selection(setup, monkeypatch, metric):
    """Under metric="loss" real scores are minus a loss (about -2.3 at chance): the worst score must still lose."""
    from evoprune.evolve import operators as ops
    from evoprune.evolve.toolbox import creator_types
    model, space, imp, x, y, recal = setup
    cfg = FitnessConfig(metric=metric, on_error="worst")
    ev = Evaluator(model, space, x, y, recal, cfg)
    _, ind_cls = creator_types()
    real = [ind_cls(uniform(space, imp, keep)) for keep in (0.1, 0.2, 0.9)]
    for ind in real:
        ind.fitness.values = ev(ind)
    worst_real = min(ind.fitness.values[0] for ind in real)
    real_score = fit._Worker._score_plan
    crashed = ind_cls(uniform(space, imp, 0.05))
    monkeypatch.setattr(fit._Worker, "_score_plan", lambda self, plan, macs, data: (_ for _ in ()).throw(OSError("x")))
    with pytest.warns(UserWarning, match="scored as worst"):
        crashed.fitness.values = Evaluator(model, space, x, y, recal, cfg)(crashed)
    monkeypatch.setattr(fit._Worker, "_score_plan", real_score)
    assert crashed.fitness.values[0] < worst_real
    pop = real + [crashed]
    assert crashed not in ops.sel_topk(pop, len(real))
    assert crashed not in ops.sel_budget(pop, len(real), budget=space.base_macs)
    # NSGA-II: the crashed plan (worst score at full MACs) is dominated, so it is the one left out
    assert all(ind is not crashed for ind in ops.sel_nsga2(pop, len(real)))


def test_malformed_individuals_raise_plan_errors(setup):
    model, space, imp, x, y, recal = setup
    ev = Evaluator(model, space, x, y, recal)
    with pytest.raises(PlanError, match="genes"):
        ev([1] * (len(space) - 1))
    with pytest.raises(PlanError, match="0 or 1"):
        ev([1] * (len(space) - 1) + [2])


def test_the_evaluator_pickles_small_and_carries_no_module(setup):
    model, space, imp, x, y, recal = setup
    ev = Evaluator(model, space, x, y, recal)
    blob = pickle.dumps(ev)
    assert len(blob) < 2000
    assert b"torch.nn" not in blob and b"Conv2d" not in blob
    ind = uniform(space, imp, 0.5)
    want = ev(ind)
    fit._WORKERS.pop(ev.token)  # as in a fresh worker process: state is loaded again from the registry
    assert pickle.loads(blob)(ind) == want


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(score_x=torch.zeros(0, 3, 16, 16), score_y=torch.zeros(0, dtype=torch.long)), ConfigError, "non-empty"),
    (dict(score_x=torch.zeros(4, 3, 8, 8), score_y=torch.zeros(4, dtype=torch.long)), ModelError, "shape"),
    (dict(recal_x=None), ConfigError, "recal"),
    (dict(config=FitnessConfig(metric="f1")), ConfigError, "metric"),
    (dict(config=FitnessConfig(mode="fast")), ConfigError, "mode"),
    (dict(config=FitnessConfig(on_error="ignore")), ConfigError, "on_error"),
])
def test_bad_evaluator_inputs_are_refused(setup, kwargs, error, match):
    model, space, imp, x, y, recal = setup
    args = dict(score_x=x, score_y=y, recal_x=recal)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        Evaluator(model, space, **args)


def test_nan_weights_are_refused(setup):
    model, space, imp, x, y, recal = setup
    import copy
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        Evaluator(bad, space, x, y, recal)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_cuda_without_a_gpu_is_a_config_error(setup):
    with pytest.raises(ConfigError, match="cuda"):
        FitnessConfig(device="cuda").check()


def test_recalibrate_bn_leaves_dropout_in_eval_mode():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.9),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
    seen = []
    net[2].register_forward_hook(lambda m, i, o: seen.append(m.training))
    batch = torch.randn(8, 3, 4, 4) + 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit.recalibrate_bn(net, [batch])
    assert seen == [False] and not net.training
    with torch.no_grad():
        want = net[0](batch).mean(dim=(0, 2, 3))
    assert torch.allclose(net[1].running_mean, want, atol=1e-5)  # the batch's statistics, not a momentum blend
    assert net[1].momentum == 0.1


def test_short_distillation_steps_raise_the_score_of_a_heavily_pruned_plan(setup, state_guard):
    model, space, imp, x, y, recal = setup
    check = state_guard(model)
    ind = uniform(space, imp, 0.2)
    quick = Evaluator(model, space, x, y, recal)(ind)[0]
    tuned = Evaluator(model, space, x, y, recal, FitnessConfig(finetune_steps=30, finetune_lr=0.02))(ind)[0]
    assert tuned > quick
    check()  # the fine-tuning happened on a pruned copy
    with pytest.raises(ConfigError, match="finetune_steps"):
        FitnessConfig(finetune_steps=-1).check()


def test_cut_steps_distil_only_plans_that_cut_a_connection(setup):
    """``cut_steps`` judges depth cuts after a short distillation, and leaves every other plan's score alone."""
    model, space, imp, x, y, recal = setup
    assert space.units, "the tiny CNN needs a cuttable unit for this test"
    keep = uniform(space, imp, 0.6)
    cut = uniform(space, imp, 0.6, cut=[space.units[0].name])
    plain = Evaluator(model, space, x, y, recal)
    judged = Evaluator(model, space, x, y, recal, FitnessConfig(cut_steps=30, finetune_lr=0.02))
    assert judged(keep) == plain(keep)  # no cut: same score, same cost, no training
    assert judged(cut)[0] > plain(cut)[0]  # a cut recovers under distillation
    assert judged(cut)[1] == plain(cut)[1]
    with pytest.raises(ConfigError, match="cut_steps must be an int >= 0"):
        FitnessConfig(cut_steps=-1).check()
    with pytest.raises(ConfigError, match="cut_steps needs bn_recalibration"):
        FitnessConfig(cut_steps=5, bn_recalibration=False).check()


@pytest.mark.parametrize("config", [FitnessConfig(mode="physical"), FitnessConfig(mode="masked"),
                                    FitnessConfig(reconstruct="lsq", calib_images=64)])
def test_a_plan_is_resolved_once_per_fitness_call(setup, monkeypatch, config):
    """The slicing (or masking) and the refit share one resolution of the plan: the cut units and kept channels are
    worked out once per scored plan, on every path."""
    model, space, imp, x, y, recal = setup
    resolved = []
    real = PruningSpace.resolve

    def counting(self, plan):
        if not hasattr(plan, "units"):  # a PruningPlan, not an already resolved one
            resolved.append(plan)
        return real(self, plan)
    monkeypatch.setattr(PruningSpace, "resolve", counting)
    ev = Evaluator(model, space, x, y, recal, config)
    ev(uniform(space, imp, 0.5, ("features.3",)))
    assert len(resolved) == 1


def test_a_resolved_plan_prunes_as_the_plan_does(setup):
    """space.resolve(plan): the cut units, the channels kept once a cut hands its input on, and the same model from
    slice_plan, apply_plan and the cost, whether they get the plan or its resolution."""
    from evoprune import apply_plan, slice_plan
    model, space, imp, x, y, recal = setup
    plan = space.decode(uniform(space, imp, 0.5, ("features.3",)))
    r = space.resolve(plan)
    assert [u.name for u in r.units] == ["features.3"] and space.resolve(r) is r
    assert not r.alive("features.3") and r.alive(space.groups[0].members[0])
    assert space.cost(r) == space.cost(plan)
    with torch.no_grad():
        want = slice_plan(model, plan, space)(x[:8])
        for net in (slice_plan(model, r, space), apply_plan(model, r, x[:1], space=space)):
            assert torch.allclose(net.eval()(x[:8]), want, atol=1e-5)
