"""Cost of the utility stage's linear probe (workflow_scripts.utility.fit_logistic_regression) at ImageNet's shape.

ImageNet-1k train is 1.28M images × 768-d features (ViT-B) × 1,000 classes. One L-BFGS function evaluation
is a forward and a backward pass of a (n × d) @ (d × C) product, so its cost is linear in n; the number of
evaluations depends on the problem, not on n. This fits probes at a few smaller n (random features with a
class signal, one thread), reports time and evaluations, and extrapolates the per-evaluation cost to 1.28M.

Run from the repository root:  .venv/bin/python benchmarks/linear_probe.py  (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from workflow_scripts.utility import fit_logistic_regression

IMAGENET_TRAIN = 1_281_167


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="training rows (repeatable; default 2,000 and 8,000)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    for n in args.n or [2000, 8000]:
        labels = torch.from_numpy(rng.integers(0, args.classes, n))
        centres = torch.from_numpy(rng.normal(size=(args.classes, args.dim)).astype(np.float32))
        features = centres[labels] * 0.5 + torch.from_numpy(rng.normal(size=(n, args.dim)).astype(np.float32))
        evaluations = 0
        original = torch.nn.functional.cross_entropy

        def counted(*a, original=original, **k):
            nonlocal evaluations
            evaluations += 1
            return original(*a, **k)

        torch.nn.functional.cross_entropy = counted
        wall, cpu = time.perf_counter(), cpu_seconds()
        fit_logistic_regression(features, labels, args.classes, args.max_iter)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        torch.nn.functional.cross_entropy = original
        per_eval = cpu / evaluations
        print(
            f"n={n:>8,} d={args.dim} C={args.classes}: {evaluations} evaluations, wall {wall:.1f} s, "
            f"cpu {cpu:.1f} s, {per_eval * 1e3:.1f} cpu-ms/evaluation -> "
            f"{per_eval * IMAGENET_TRAIN / n:.1f} cpu-s/evaluation at {IMAGENET_TRAIN:,}"
        )


if __name__ == "__main__":
    main()
