"""evoprune inside your own DEAP loop: a stock ``deap.algorithms.eaMuPlusLambda`` with your own statistics and
hall of fame, evoprune only providing the chromosome, the operators and the fitness.

    python examples/deap_pipeline.py --out runs/deap_pipeline
    python -m scoop -n 2 examples/deap_pipeline.py --out runs/deap_pipeline     # fitness on SCOOP workers

It trains a tiny CNN on generated images (a few seconds, no download), searches which channels and connections to
keep with NSGA-II (score up, MACs down), prints the Pareto front (the hall of fame), then physically prunes the
model with the chosen plan and exports it (``best.pt``, ``best.pt2``, ``best.onnx`` with the onnx extra, ``best.json``).
"""
import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from deap import algorithms, base, tools

import evoprune
import evoprune.evolve.toolbox
from evoprune.data import normalize, synthetic
from evoprune.space.importance import channel_importance
from evoprune.models import tiny_cnn
from evoprune.train import evaluate, train

# SCOOP workers import this file (not as __main__) and unpickle individuals of these DEAP creator types: create
# them at import time, in every process.
evoprune.evolve.toolbox.creator_types()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/deap_pipeline", help="where the best pruned model is exported")
    p.add_argument("--mu", type=int, default=12, help="parents kept each generation (mu)")
    p.add_argument("--lambda", dest="lambda_", type=int, default=12, help="offspring per generation (lambda)")
    p.add_argument("--ngen", type=int, default=4, help="generations")
    p.add_argument("--cxpb", type=float, default=0.4,
                   help="crossover probability (cxpb + toolbox.p_mut must be <= 1 for eaMuPlusLambda)")
    p.add_argument("--max-macs", type=float, default=0.5,
                   help="export the best-scoring plan with at most this fraction of the original MACs")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # a tiny network runs fastest on one thread
    torch.manual_seed(args.seed)

    # 1. A trained model and data: a tiny CNN on generated 16x16 images of 4 classes.
    data = synthetic(1200, 600, classes=4, size=16, seed=args.seed)
    model = tiny_cnn(num_classes=4)
    train(model, data.train, 3, batch_size=64, lr=0.05, seed=args.seed, progress=False)
    model.eval()
    print(f"baseline: val top-1 {evaluate(model, data.val):.4f}")

    # 2. What can be pruned, and how a plan is scored: top-1 on one half of val (stratified) after BN
    #    re-calibration. The other half is only for reporting: never report accuracy on the images you searched on.
    search_set, report_set = data.val.stratified_split(0.5, seed=args.seed)
    #    Images are normalised with the statistics the data carry (CIFAR-10's unless set with data.with_stats).
    score_x, score_y = normalize(search_set.images, *data.stats), search_set.labels
    recal_x = [normalize(data.train.images[i:i + 64], *data.stats) for i in range(0, 256, 64)]
    example = score_x[:1]
    space = evoprune.PruningSpace.from_model(model, example)
    print(space)
    evaluator = evoprune.Evaluator(model, space, score_x, score_y, recal_x)

    # 3. Your own DEAP toolbox; evoprune registers individual, population, mate, mutate, select, evaluate, map.
    #    register seeds nothing: DEAP's operators draw from Python's random module, seeded here as DEAP's examples do.
    random.seed(args.seed)
    toolbox = base.Toolbox()
    evoprune.register(toolbox, space, evaluator, objective="nsga2",
                      importance=channel_importance(model, space, example))
    pop = toolbox.population(n=args.mu)  # already repaired (min_keep, round_to, budget), like every offspring

    stats = tools.Statistics(lambda ind: ind.fitness.values)
    stats.register("best_score", lambda fits: max(f[0] for f in fits))
    stats.register("min_mmacs", lambda fits: min(f[1] for f in fits) / 1e6)
    stats.register("mean_mmacs", lambda fits: float(np.mean([f[1] for f in fits])) / 1e6)
    hof = tools.ParetoFront()

    pop, logbook = algorithms.eaMuPlusLambda(pop, toolbox, mu=args.mu, lambda_=args.lambda_, cxpb=args.cxpb,
                                             mutpb=toolbox.p_mut, ngen=args.ngen, stats=stats, halloffame=hof,
                                             verbose=True)

    # 4. The hall of fame: the Pareto front of (score, MACs) over every evaluated plan.
    print(f"\nhall of fame ({len(hof)} plans on the Pareto front):")
    print(f"  {'score':>7} {'MMACs':>8} {'MACs %':>7}")
    for ind in sorted(hof, key=lambda ind: ind.fitness.values[1]):
        score, macs = ind.fitness.values
        print(f"  {score:7.4f} {macs / 1e6:8.3f} {100 * macs / space.base_macs:6.1f}%")

    # 5. Physically prune with the best plan under the MACs limit, and export it.
    limit = args.max_macs * space.base_macs
    under = [ind for ind in hof if ind.fitness.values[1] <= limit]
    best = max(under, key=lambda ind: ind.fitness.values[0]) if under else \
        min(hof, key=lambda ind: ind.fitness.values[1])
    plan = space.decode(best)
    # structural distillation: refit every changed layer to the unpruned model's outputs (closed form, no labels)
    pruned = evoprune.reconstruct(model, evoprune.apply_plan(model, plan, example, space=space), plan, space, recal_x)
    written = evoprune.export(pruned, Path(args.out) / "best", example, plan=plan)
    evaluator.release()
    print(f"\nbest plan: score {best.fitness.values[0]:.4f}, {best.fitness.values[1] / 1e6:.3f} MMACs; "
          f"top-1 on the report half of val after pruning {evaluate(pruned, report_set):.4f} (no fine-tuning)")
    print("exported: " + ", ".join(written.values()))
    return 0


if __name__ == "__main__":
    code = main()
    if code:  # a plain sys.exit(0) makes SCOOP print a traceback, so exit explicitly only on failure
        sys.exit(code)
