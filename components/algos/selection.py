"""Which rollouts to keep: the selection rules shared by the filtering and down-sampling samplers.

Pure functions over one prompt's rewards (or positive flags), no model and no context, each testable
alone. Indices refer to generation order, and every selector returns the kept indices sorted in
generation order, so ties always resolve to the earlier rollout and the result is deterministic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def spread(values: Sequence[float]) -> float:
    """max - min: 0 when all values are equal (or there are fewer than two), so the group has no signal.

    Spread rather than mean: with non-binary rewards (partial credit, length shaping) a mean strictly
    between 0 and 1 says nothing about whether the rewards differ.
    """
    return max(values) - min(values) if len(values) > 1 else 0.0


def population_std(values: Sequence[float]) -> float:
    """Standard deviation with divisor N (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def balanced_indices(is_pos: Sequence[bool], n: int, n_pos: int) -> list[int]:
    """Keep ``n`` items in generation order: the first ``min(n_pos, P)`` positives, then negatives up
    to ``n``, then further positives if still short (Reinforce-Ada's deterministic down-sampling).
    Fewer than ``n`` come back only when fewer than ``n`` exist.
    """
    pos = [i for i, p in enumerate(is_pos) if p]
    neg = [i for i, p in enumerate(is_pos) if not p]
    take_pos = min(n_pos, len(pos))
    take_neg = min(n - take_pos, len(neg))
    take_pos = min(n - take_neg, len(pos))  # top up with extra positives when negatives ran short
    return sorted(pos[:take_pos] + neg[:take_neg])


def max_variance_indices(rewards: Sequence[float], m: int) -> list[int]:
    """The ``m`` rewards with the largest (population) variance, in O(n log n).

    PODS's structure result: an optimal subset is always the k highest plus the m - k lowest rewards
    for some k in 0..m. Sort once, then score every split in O(1) from prefix sums of the centred
    rewards (centring keeps E[r^2] - E[r]^2 accurate). Among equally good splits the smallest k wins;
    among rollouts with equal rewards the earliest are kept.
    """
    n = len(rewards)
    if not 0 < m <= n:
        raise ValueError(f"need 0 < m <= n, got m={m}, n={n}")
    order = sorted(range(n), key=lambda i: rewards[i])
    mu = sum(rewards) / n
    a = [rewards[i] - mu for i in order]
    lo, lo2, hi, hi2 = [0.0], [0.0], [0.0], [0.0]  # sums (of squares) of the j lowest / j highest
    for j in range(m):
        lo.append(lo[-1] + a[j])
        lo2.append(lo2[-1] + a[j] * a[j])
        hi.append(hi[-1] + a[n - 1 - j])
        hi2.append(hi2[-1] + a[n - 1 - j] * a[n - 1 - j])
    best_k, best_var = 0, -1.0
    for k in range(m + 1):
        s, q = hi[k] + lo[m - k], hi2[k] + lo2[m - k]
        var = q / m - (s / m) ** 2
        if var > best_var + 1e-12:
            best_k, best_var = k, var
    # Take the chosen multiset of values, each value from its earliest rollouts.
    need = Counter(rewards[i] for i in order[: m - best_k] + order[n - best_k :])
    kept = []
    for i, r in enumerate(rewards):
        if need[r] > 0:
            need[r] -= 1
            kept.append(i)
    return kept


def top_indices(rewards: Sequence[float], m: int) -> list[int]:
    """The ``m`` highest rewards (ties: earlier rollouts first)."""
    return sorted(sorted(range(len(rewards)), key=lambda i: -rewards[i])[:m])
