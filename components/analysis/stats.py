"""Small-sample tests for the claims table: intervals over seeds, an equivalence test, a ratio interval.

Every verdict in the table rests on a handful of seeds per arm, so the normal approximation ("2
standard errors") is anti-conservative: with 3 seeds per arm Welch's t has 2-4 degrees of freedom
and a 95% critical value of 2.8-4.3, not 2. These functions use the t distribution with its degrees
of freedom (SciPy's), or a bootstrap over seeds where no closed form fits (a ratio of costs).

- :func:`welch`: the difference of two means from their summaries (mean, sample std, n), with the
  Welch-Satterthwaite degrees of freedom, a two-sided p-value and a confidence interval.
- :func:`paired`: the same for per-seed differences, when both arms share a seed and the evaluation
  draw (the difference then cancels what the seed shares).
- :func:`equivalence`: two one-sided tests (TOST) against a stated margin: equivalent when the
  ``1 - 2 alpha`` interval lies inside ``[-margin, margin]``.
- :func:`ratio_interval`: a percentile bootstrap interval, over seeds, of the ratio of two mean costs
  (a seed that never reached the target costs infinity: the interval then says so).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _st


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided confidence interval and the test of "no difference"."""

    estimate: float
    low: float
    high: float
    p: float = math.nan  # two-sided p-value of estimate = 0 (NaN where there is none)
    df: float = math.nan  # degrees of freedom of the t distribution used
    level: float = 0.95

    def excludes(self, value: float) -> bool:
        return not (self.low <= value <= self.high)

    def __str__(self) -> str:
        p = "" if math.isnan(self.p) else f", p={self.p:.2g}"
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]{p}"


def _undefined(estimate: float = math.nan, level: float = 0.95) -> Interval:
    return Interval(estimate, -math.inf, math.inf, math.nan, math.nan, level)


def welch(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int, level: float = 0.95) -> Interval:
    """Interval for ``m1 - m2`` from two samples' means, sample standard deviations and sizes.

    Undefined (an infinite interval) with fewer than 2 values on a side. Two samples without any
    spread give a zero-width interval at the difference."""
    d = m1 - m2
    if n1 < 2 or n2 < 2 or any(math.isnan(x) for x in (m1, m2, s1, s2)):
        return _undefined(d, level)
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    se = math.sqrt(v1 + v2)
    if se == 0:
        return Interval(d, d, d, 0.0 if d else 1.0, math.inf, level)
    df = (v1 + v2) ** 2 / ((v1 * v1) / (n1 - 1) + (v2 * v2) / (n2 - 1)) if v1 + v2 > 0 else math.inf
    q = float(_st.t.ppf(0.5 + level / 2, df))
    p = float(2 * _st.t.sf(abs(d) / se, df))
    return Interval(d, d - q * se, d + q * se, p, df, level)


def paired(differences: Sequence[float], level: float = 0.95) -> Interval:
    """Interval for the mean of per-seed differences (one-sample t, ``n - 1`` degrees of freedom)."""
    x = [float(v) for v in differences if not math.isnan(v)]
    n = len(x)
    if n < 2:
        return _undefined(x[0] if x else math.nan, level)
    mean = sum(x) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1) / n)
    if se == 0:
        return Interval(mean, mean, mean, 0.0 if mean else 1.0, n - 1, level)
    q = float(_st.t.ppf(0.5 + level / 2, n - 1))
    return Interval(mean, mean - q * se, mean + q * se, float(2 * _st.t.sf(abs(mean) / se, n - 1)), n - 1, level)


def equivalence(interval_90: Interval, margin: float) -> bool:
    """TOST at ``alpha = (1 - level) / 2``: the difference is within ``±margin`` when the interval of
    level ``1 - 2 alpha`` (90% for alpha 0.05) lies inside ``[-margin, margin]``."""
    return -margin < interval_90.low and interval_90.high < margin


def ratio_interval(
    method: Sequence[float], control: Sequence[float], level: float = 0.95, resamples: int = 4000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of ``mean(method) / mean(control)``, resampling each arm's seeds.

    ``inf`` in ``method`` (a seed that never reached the target) makes every resample containing it
    infinite, so the interval's high end is infinite when such a seed is common enough. A control
    whose mean cost is 0 leaves the ratio undefined."""
    m, c = [float(v) for v in method], [float(v) for v in control]
    if not m or not c or sum(c) <= 0:
        return _undefined(level=level)
    est = (sum(m) / len(m)) / (sum(c) / len(c))
    if len(m) < 2 or len(c) < 2:
        return _undefined(est, level)
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        rm = sum(rng.choice(m) for _ in m) / len(m)
        rc = sum(rng.choice(c) for _ in c) / len(c)
        draws.append(rm / rc if rc > 0 else math.inf)
    return percentile_interval(est, draws, level)


def percentile_interval(estimate: float, draws: Sequence[float], level: float = 0.95) -> Interval:
    """A percentile interval of bootstrap ``draws`` (NaN draws dropped; ``inf`` kept, it sorts last)."""
    d = sorted(v for v in draws if not math.isnan(v))
    if len(d) < 2:
        return _undefined(estimate, level)
    lo = d[int(math.floor((1 - level) / 2 * (len(d) - 1)))]
    hi = d[int(math.ceil((1 + level) / 2 * (len(d) - 1)))]
    return Interval(estimate, lo, hi, math.nan, math.nan, level)


def eval_noise(p: float, items: int, samples: int) -> float:
    """The standard error of one held-out pass@1 measurement: ``sqrt(p (1 - p) / (items x samples))``
    (Bernoulli draws; a lower bound when items differ in difficulty). 64 items x 2 samples has about
    3x the noise of 300 x 4."""
    if items <= 0 or samples <= 0 or math.isnan(p):
        return math.nan
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / (items * samples))


# ---- power: what a row's seeds can resolve, and how many seeds the paper's effect needs ------------
POWER = 0.8  # the power the estimates below are stated at (two-sided alpha 0.05)
MAX_SEEDS = 500  # beyond this an effect is reported as unresolvable at the measured noise


def _welch_se_df(s1: float, n1: int, s2: float, n2: int) -> tuple[float, float]:
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    se = math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / ((v1 * v1) / (n1 - 1) + (v2 * v2) / (n2 - 1)) if v1 + v2 > 0 else math.inf
    return se, df


def detectable_difference(
    s1: float, n1: int, s2: float, n2: int, alpha: float = 0.05, power: float = POWER, one_sided: bool = False
) -> float:
    """The smallest true difference of two means that Welch's test at ``alpha`` (two-sided unless
    ``one_sided``) detects with probability ``power``, at sample stds ``s1, s2`` and sizes ``n1, n2``:
    ``(t_{1-alpha/2} + t_{power}) * se`` on the Welch degrees of freedom (NaN when a side has < 2
    values or no spread is known)."""
    if n1 < 2 or n2 < 2 or any(math.isnan(x) for x in (s1, s2)):
        return math.nan
    se, df = _welch_se_df(s1, n1, s2, n2)
    a = alpha if one_sided else alpha / 2
    return float((_st.t.ppf(1 - a, df) + _st.t.ppf(power, df)) * se)


def seeds_to_detect(effect: float, s1: float, s2: float, alpha: float = 0.05, power: float = POWER) -> int | None:
    """Seeds per arm for Welch's test to detect a true difference ``effect`` (None: more than
    :data:`MAX_SEEDS`, or no spread known)."""
    if math.isnan(effect) or effect == 0 or any(math.isnan(x) for x in (s1, s2)):
        return None
    for n in range(2, MAX_SEEDS + 1):
        if detectable_difference(s1, n, s2, n, alpha, power) <= abs(effect):
            return n
    return None


def seeds_for_equivalence(
    margin: float, s1: float, s2: float, true_difference: float = 0.0, alpha: float = 0.05, power: float = POWER
) -> int | None:
    """Seeds per arm for TOST at ``margin`` to conclude equivalence with probability about ``power``
    when the true difference is ``true_difference`` (normal-approximation form on the t quantiles:
    ``(t_{1-alpha} + t_{1-(1-power)/2}) * se <= margin - |true_difference|``; None: unreachable)."""
    room = margin - abs(true_difference)
    if room <= 0 or any(math.isnan(x) for x in (s1, s2)):
        return None
    for n in range(2, MAX_SEEDS + 1):
        se, df = _welch_se_df(s1, n, s2, n)
        if (_st.t.ppf(1 - alpha, df) + _st.t.ppf(1 - (1 - power) / 2, df)) * se <= room:
            return n
    return None


def ratio_power(ratio: Interval, n: int, factor: float, power: float = POWER) -> tuple[float, int | None]:
    """From a cost ratio's 95% bootstrap interval at ``n`` seeds per arm: the smallest ratio (below
    1) the same noise resolves from 1 with ``power``, and the seeds per arm that would resolve the
    claimed ``factor`` (the log-ratio's standard error read off the interval, shrinking as 1/sqrt(n)).
    ``(nan, None)`` when the interval is open (a resample that never got there) or undefined."""
    if not (0 < ratio.low <= ratio.high < math.inf) or n < 2 or not 0 < factor < 1:
        return math.nan, None
    z = float(_st.norm.ppf(0.975)) + float(_st.norm.ppf(power))
    se = (math.log(ratio.high) - math.log(ratio.low)) / (2 * float(_st.norm.ppf(0.975)))
    need = math.ceil(n * (z * se / abs(math.log(factor))) ** 2)
    return math.exp(-z * se), (max(need, 2) if need <= MAX_SEEDS else None)
