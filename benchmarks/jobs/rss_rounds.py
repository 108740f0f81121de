"""Peak and current RSS after each round of a 5-round VGG16 search, serially or under SCOOP.

    python benchmarks/jobs/rss_rounds.py
    python -m scoop -n 2 benchmarks/jobs/rss_rounds.py

Uses only the public API that every evoprune version since 0.1 has (``search`` with ``on_round``), so B3 can run
it against an older checkout (``PYTHONPATH=<checkout>``). A small search (population 8, 1 generation, no
fine-tuning) on the shared VGG16-BN teacher when present; random images (memory does not depend on them). Prints
one line ``rss_rounds: {json}``: per round, this process's VmRSS/VmHWM and, under SCOOP, every worker's (MiB).
"""
import json
import os
import sys
from pathlib import Path

import torch

from evoprune.evolve import search
from evoprune.models import load_weights, vgg16_bn_cifar

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def status(pid) -> dict:
    """VmRSS and VmHWM of a process, in MiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def scoop_workers() -> list[int]:
    """The SCOOP worker processes of this run (same task port as this one), this one included."""
    mine = Path("/proc/self/cmdline").read_bytes().split(b"\0")
    port = next((mine[i + 1] for i, a in enumerate(mine[:-1]) if a == b"--taskPort"), None)
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"scoop.bootstrap" in a for a in cmd) and port is not None and port in cmd:
            pids.append(int(pid))
    return sorted(pids)


def main():
    torch.manual_seed(0)
    model = vgg16_bn_cifar().eval()
    weights = SHARED / "models" / "vgg16_bn_cifar10.pt"
    if weights.exists():
        load_weights(model, weights)
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    recal = [torch.randn(64, 3, 32, 32) for _ in range(2)]
    rows = []

    def on_round(k, net, row, plan):
        pids = scoop_workers() or [os.getpid()]
        rows.append({"round": k, "macs_pct": row["macs_pct"], "main": status(os.getpid()),
                     "workers": {str(p): status(p) for p in pids}})

    search(model, x[:1], x, y, recal_x=recal, rounds=5, generations=1, population=8, elites=2, target=0.2,
           on_round=on_round, progress=False, verbose=False)
    print("rss_rounds: " + json.dumps(rows), flush=True)


if __name__ == "__main__":
    sys.exit(main())
