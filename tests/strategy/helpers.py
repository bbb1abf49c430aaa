"""Hand-made cost tables, workloads and estimators for the strategy tests."""

import random

from rlhfspec.strategy.acceptance import AcceptanceEstimator
from rlhfspec.strategy.base import Workload


def table(f):
    return {(b, q): f(b, q) for b in (1, 2, 4, 8, 16, 32, 64) for q in (1, 3, 5, 9)}


def workload(b, remaining=100, drafters=("draft",)):
    return Workload(list(range(b)), [50] * b, [remaining] * b, list(drafters))


def estimator(rate, drafter="draft", samples=64, steps=200):
    """An estimator that has seen `steps` steps of i.i.d. acceptance at `rate`."""
    est = AcceptanceEstimator(decay=1.0)
    rng = random.Random(0)
    for _ in range(steps):
        accepted = []
        for _ in range(samples):
            k = 0
            while k < 4 and rng.random() < rate:
                k += 1
            accepted.append(k)
        est.update(drafter, list(range(samples)), [4] * samples, accepted)
    return est
