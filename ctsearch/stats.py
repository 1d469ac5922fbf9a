"""Intervals and paired comparisons for Table 1: is a difference between configurations real or noise?

Plain numpy on per-query scores (``ctsearch evaluate``'s ``per_query``: average precision at K
or 0/1 k-NN correctness of each test query). Scores are fractions; verdicts speak in percentage
points.

- ``bootstrap_ci``: percentile bootstrap over queries of one run's mean score.
- ``paired_comparison``: configuration A minus B on the same queries and seeds. Its interval is
  a two-level bootstrap (seeds and queries resampled independently), so it carries both the
  training randomness between seeds and the sampling of the test queries; with one seed it is the
  query bootstrap. Its p-value is a sign-flip permutation test on the per-query differences
  averaged over seeds (exact when there are at most 2**12 sign patterns): it asks whether these
  trained encoders differ on this test set, not whether the methods would with new seeds.
- ``verdict``: one line from a comparison; a difference is claimed only when the interval excludes 0
  and the permutation test rejects at the same level.

Example:
    >>> a = np.array([[1.0, 1.0, 0.0, 1.0]]); b = np.array([[0.0, 1.0, 0.0, 0.0]])
    >>> c = paired_comparison(a, b, n_boot=2000, seed=0)
    >>> round(c.difference, 2), c.p_value
    (0.5, 0.5)
    >>> verdict("HU clipping", "standard", "MAP@5", c)
    'no detectable difference between HU clipping and standard on MAP@5: +50.0 points, 95% CI [0.0, 100.0], p = 0.5'
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

N_BOOT = 10_000  # bootstrap resamples: the 2.5% and 97.5% quantiles move by < 0.1 point beyond this
LEVEL = 0.95
_CHUNK = 256  # resamples per block: bounds memory at seeds x _CHUNK x queries floats
_EXACT_FLIPS = 12  # up to 2**12 sign patterns the permutation test enumerates them all


def bootstrap_ci(
    scores: np.ndarray,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-query ``scores`` and its percentile bootstrap interval.

    ``scores`` [queries] (one run) or [seeds, queries] (a configuration's runs: seeds and queries
    are resampled independently, as in ``paired_comparison``). ``groups`` [queries]: resample
    whole groups (e.g. the query's patient: slices of one patient are not independent) instead
    of single queries.

    Example (two queries: resampled means are 0, 0.5 or 1, so the 95% interval spans both ends):
        >>> bootstrap_ci(np.array([0.0, 1.0]), n_boot=2000)
        (0.5, 0.0, 1.0)
    """
    scores = np.asarray(scores, np.float64)
    if scores.ndim not in (1, 2) or not scores.size:
        raise ValueError(f"need scores [queries] or [seeds, queries], got shape {scores.shape}")
    return _two_level_bootstrap(np.atleast_2d(scores), n_boot, level, seed, groups)


@dataclass(frozen=True)
class Comparison:
    """A minus B, paired over the same seeds and queries (fractions, not percent)."""

    difference: float  # mean over seeds and queries of A - B
    low: float  # bootstrap interval of the difference
    high: float
    p_value: float  # two-sided sign-flip permutation test of the per-query differences
    seeds: int
    queries: int
    level: float = LEVEL

    def to_json(self) -> dict:
        return asdict(self)


def paired_comparison(
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> Comparison:
    """Compare configurations A and B from their per-query scores a, b [seeds, queries].

    Row i of both holds the runs trained with the same seed, column j the same test query.
    ``groups`` [queries] (e.g. patient ids): the bootstrap resamples and the permutation test
    flips whole groups, for queries that are not independent within a group.

    Example (one seed; the differences are [1, 0, 0, 1]):
        >>> c = paired_comparison(np.array([[1.0, 1, 0, 1]]), np.array([[0.0, 1, 0, 0]]), n_boot=500)
        >>> c.difference, c.seeds, c.queries
        (0.5, 1, 4)
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or not a.size:
        raise ValueError(f"need two [seeds, queries] arrays of one shape, got {a.shape} and {b.shape}")
    d = a - b
    mean, low, high = _two_level_bootstrap(d, n_boot, level, seed, groups)
    per_query = d.mean(axis=0)
    if groups is not None:  # flip a whole group's sign at once: test on the groups' summed differences
        per_query = np.bincount(_group_index(groups, d.shape[1]), weights=per_query)
    return Comparison(mean, low, high, sign_flip_p(per_query, n_boot, seed), d.shape[0], d.shape[1], level)


def sign_flip_p(d: np.ndarray, n_perm: int = N_BOOT, seed: int = 0) -> float:
    """Two-sided p-value that paired differences d [n] are centred on 0 (random sign flips).

    Counts sign patterns whose |mean| reaches the observed one; every pattern when n <= 12
    (exact), else ``n_perm`` random ones plus the observed (so p is never 0).

    Example (differences [1, 2, 3]: only +++ and --- reach |mean| 2, 2 of 8 patterns):
        >>> sign_flip_p(np.array([1.0, 2.0, 3.0]))
        0.25
    """
    d = np.asarray(d, np.float64)
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, observed)  # the observed pattern itself must count despite rounding
    if len(d) <= _EXACT_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float(np.mean(np.abs(signs @ d / len(d)) >= observed - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, _CHUNK):
        signs = rng.choice((1.0, -1.0), size=(min(_CHUNK, n_perm - start), len(d)))
        hits += int(np.sum(np.abs(signs @ d / len(d)) >= observed - tol))
    return (hits + 1) / (n_perm + 1)


def smallest_p(groups: int, n_perm: int = N_BOOT) -> float:
    """The smallest p ``sign_flip_p`` can return for ``groups`` paired differences (e.g. patients):
    2 / 2**groups when it enumerates every pattern (the observed one and its mirror image always
    count), else 1 / (n_perm + 1).

    Example (4 test patients: no difference can reach p < 0.05):
        >>> smallest_p(4), smallest_p(20, n_perm=9999)
        (0.125, 0.0001)
    """
    if groups < 1:
        raise ValueError(f"need at least one group, got {groups}")
    return 2 / 2**groups if groups <= _EXACT_FLIPS else 1 / (n_perm + 1)


def no_verdict_possible(groups: int, n_perm: int = N_BOOT, unit: str = "test patients") -> str | None:
    """A sentence when ``groups`` paired units are too few for the sign-flip test to ever reject
    at ``LEVEL`` (so ``verdict`` can never claim a direction), else None.

    Example:
        >>> no_verdict_possible(12) is None
        True
        >>> no_verdict_possible(4)
        'With 4 test patients the smallest p the sign-flip test can give is 2/2^4 = 0.125, not below 0.05: no difference can be claimed on this test split, however many slices it has; more test patients are needed.'
    """
    p = smallest_p(groups, n_perm)
    if p < 1 - LEVEL:
        return None
    if groups == 1:
        unit = unit.removesuffix("s")
    return (
        f"With {groups} {unit} the smallest p the sign-flip test can give is 2/2^{groups} = {p:.3g}, "
        f"not below {1 - LEVEL:.2g}: no difference can be claimed on this test split, however many "
        "slices it has; more test patients are needed."
    )


def _group_index(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Group number 0..G-1 of each of n queries (each query its own group when ``groups`` is None)."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"need one group per query ({n}), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def _two_level_bootstrap(
    d: np.ndarray, n_boot: int, level: float, seed: int, groups: np.ndarray | None = None
) -> tuple[float, float, float]:
    """(mean, percentile interval) of the grand mean of d [seeds, queries], resampling seeds (rows)
    and query groups (columns; single queries without ``groups``) independently with replacement."""
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level} and {n_boot}")
    rng = np.random.default_rng(seed)
    s, n = d.shape
    index = _group_index(groups, n)
    n_groups = int(index.max()) + 1
    sums = np.stack([np.bincount(index, weights=row, minlength=n_groups) for row in d])  # [seeds, G]
    sizes = np.bincount(index, minlength=n_groups).astype(np.float64)  # [G]
    means = np.empty(n_boot)
    for start in range(0, n_boot, _CHUNK):
        m = min(_CHUNK, n_boot - start)
        draws = rng.integers(n_groups, size=(m, n_groups))
        times = np.stack([np.bincount(row, minlength=n_groups) for row in draws]).astype(np.float64)  # [m, G]
        per_seed = (sums @ times.T) / (times @ sizes)  # [seeds, m]: each seed's mean over the drawn queries
        seeds = rng.integers(s, size=(m, s)) if s > 1 else np.zeros((m, 1), np.int64)
        means[start : start + m] = per_seed[seeds, np.arange(m)[:, None]].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(d.mean()), float(low), float(high)


def verdict(name_a: str, name_b: str, metric: str, c: Comparison) -> str:
    """One line on A vs B: which is better when the interval excludes 0 and p < 1 - level, else
    no detectable difference.

    Example:
        >>> c = Comparison(0.014, 0.003, 0.025, 0.004, seeds=5, queries=1310)
        >>> verdict("HU clipping", "standard", "MAP@5", c)
        'HU clipping > standard on MAP@5: +1.4 points, 95% CI [0.3, 2.5], p = 0.004'
    """
    numbers = (
        f"{100 * c.difference:+.1f} points, {100 * c.level:.0f}% CI [{100 * c.low:.1f}, {100 * c.high:.1f}], "
        f"p = {c.p_value:.2g}"
    )
    # Both must agree: with few patients a bootstrap interval can exclude 0 while no sign pattern
    # could be significant (4 patients: the smallest exact p is 2/16).
    significant = c.p_value < 1 - c.level
    if c.low > 0 and significant:
        return f"{name_a} > {name_b} on {metric}: {numbers}"
    if c.high < 0 and significant:
        return f"{name_a} < {name_b} on {metric}: {numbers}"
    return f"no detectable difference between {name_a} and {name_b} on {metric}: {numbers}"
