"""The numbers the method's paper table reports (released `eval/metric_utils.py`), beside ours.

Per question, from its n scores (1 correct, 0 not):
- mean@n: the mean score (the paper's headline number, averaged over questions);
- best@k: 1000 bootstrap resamples of k scores drawn with replacement from the n, the mean of
  their maxima (numpy's legacy generator seeded with 42 for every question, as released). Its
  expectation for c correct of n is 1 - (1 - c/n)^k: for c = 1 of n = 8, best@8 ≈ 0.656;
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) (sampling without replacement; 1.0
  for c = 1 of n = 8, k = 8), kept beside it.
A benchmark's number is the mean over its questions; "overall" is the mean over benchmarks
(each benchmark weighs the same, whatever its number of questions), as released.
"""
from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 42


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n} samples per question; lower k or raise --n")
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_at_n(scores: Sequence[float]) -> float:
    return float(np.mean(scores)) if len(scores) else 0.0


def best_at_k(scores: Sequence[float], k: int, resamples: int = BOOTSTRAP_RESAMPLES,
              seed: int = BOOTSTRAP_SEED) -> float:
    """The released bootstrap best@k: mean over `resamples` draws of k scores (with
    replacement) of their maximum; k is capped at len(scores) as released."""
    if not len(scores):
        return 0.0
    rng = np.random.RandomState(seed)  # the stream of np.random.seed(seed) + np.random.choice
    values = np.asarray(scores, dtype=np.float64)
    size = min(k, len(values))
    maxima = [values[rng.choice(len(values), size=size, replace=True)].max() for _ in range(resamples)]
    return float(np.mean(maxima))


def expected_best_at_k(n: int, c: int, k: int) -> float:
    """What best@k estimates for c correct of n binary scores: 1 - (1 - c/n)^k."""
    return 1.0 - (1.0 - c / n) ** k


def mean_over_benchmarks(rows: dict, metrics: Sequence[str]) -> dict:
    """The released "overall": each metric averaged over the benchmarks' rows (unweighted)."""
    rows = [row for name, row in rows.items() if name != "all"]
    if not rows:
        return {}
    return {"benchmarks": len(rows), "questions": sum(r["questions"] for r in rows),
            **{m: sum(r[m] for r in rows) / len(rows) for m in metrics}}
