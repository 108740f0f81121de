"""A small, complete search used by the subprocess tests (resume after SIGKILL, SCOOP workers).

    python tests/jobs/tiny_search.py OUT_DIR [--scoop-trace] [--generations G] [--executor E --workers N]
    python -m scoop -n 2 tests/jobs/tiny_search.py OUT_DIR --scoop-trace

Trains (once, cached in OUT_DIR/weights.pt) a tiny CNN on generated data, runs a 2-round search with a checkpoint
in OUT_DIR/checkpoint and writes OUT_DIR/result.json (plans, logbook, rows) atomically.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from evoprune.data import normalize, synthetic
from evoprune.evolve.engines import opened
from evoprune.evolve.fitness import FitnessConfig
from evoprune.models import tiny_cnn
from evoprune.evolve import search
from evoprune.storage import load_state_dict, torch_save, write_json
from evoprune.train import train

if os.environ.get("TINY_SEARCH_FAIL_AFTER"):  # a test hook: in every process (SCOOP workers too), fitness calls
    from evoprune.evolve import fitness  # fail once that process has made more than N of them

    _score_plan, _calls = fitness._Worker._score_plan, [0]

    def _fail_late(self, plan, macs, data):
        _calls[0] += 1
        if _calls[0] > int(os.environ["TINY_SEARCH_FAIL_AFTER"]):
            raise RuntimeError("injected failure")
        return _score_plan(self, plan, macs, data)
    fitness._Worker._score_plan = _fail_late


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--trace", action="store_true", help="write per-process evaluation logs into OUT/trace")
    p.add_argument("--no-checkpoint", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--executor", default=None, help="serial, scoop, processes or dask (default: SCOOP's map under "
                                                    "python -m scoop, else serial)")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = synthetic(1200, 400, seed=0)
    model = tiny_cnn(4, 16)
    weights = out / "weights.pt"
    if weights.exists():
        model.load_state_dict(load_state_dict(weights))
    else:
        torch.manual_seed(0)
        train(model, data.train, 3, batch_size=64, lr=0.05, progress=False, seed=0)
        torch_save(model.state_dict(), weights)
    model.eval()
    x, y = normalize(data.val.images), data.val.labels
    recal = [normalize(data.train.images[i:i + 64]) for i in range(0, 256, 64)]
    trace = None
    if args.trace:
        trace = out / "trace"
        trace.mkdir(exist_ok=True)
    with opened(args.executor, workers=args.workers) as engine:
        result = search(model, x[:1], x, y, recal_x=recal, rounds=args.rounds, generations=args.generations,
                        population=10, elites=3, target=0.2, seed=7, verbose=False, progress=False,
                        fitness=FitnessConfig(trace_dir=str(trace) if trace else None),
                        checkpoint_dir=None if args.no_checkpoint else str(out / "checkpoint"), map=engine)
    write_json(out / "result.json", {"plans": result.plans, "logbook": list(result.logbook),
                                     "scores": [r["search_score"] for r in result.rows],
                                     "macs": [r["macs"] for r in result.rows]})
    print("tiny_search: done", file=sys.stderr)


if __name__ == "__main__":
    main()
