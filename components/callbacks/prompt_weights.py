"""f-objective prompt weights: w(p) = f'(p), the emphasis an objective J_f = E_x[f(p(x))] puts on a prompt.

The gradient of ``J_f`` is ``E_x[f'(p) E_a[(r - p) grad log pi(a|x)]]`` (reference §3a), so an objective
is realised by multiplying the *unnormalised* advantage ``r - mean`` (``dr_grpo`` or ``pool_mean``) of
every rollout of prompt x by ``w(p) = f'(p)``:

=============  =====================  ==================================================================
``f``          ``w(p) = f'(p)``       what it is
=============  =====================  ==================================================================
``identity``   1                      J = E[p]: Dr. GRPO's unnormalised r - mean
``log``        1 / p                  J = E[log p]: hard prompts up-weighted (Reinforce-Ada's objective)
``arcsin``     1 / sqrt(p (1 - p))    J = E[2 arcsin sqrt p]: the weight standardised GRPO induces
``power``      alpha p^(alpha - 1)    J = E[p^alpha]
``callable``   your function          ``callable: "pkg.module:fn"`` (or ``pkg.module.fn``), fn(p) -> w
=============  =====================  ==================================================================

Pairing ``arcsin`` with the std-normalised ``grpo`` advantage would apply 1/sqrt(p(1-p)) twice; the
weights are meant for ``dr_grpo`` / ``pool_mean`` (``FObjectiveWeights`` logs, it does not refuse).

:class:`FObjectiveWeights` is a signal callback (``on_groups``), so it composes with any sampler: it
multiplies ``Group.weight`` (which ``compute_advantages`` multiplies into every advantage of the
group). How p is estimated, per stable prompt uid:

1. counts: at each visit ``n <- decay n + n_drawn``, ``k <- decay k + n_pos`` with the group's *pool*
   statistics (every sample drawn for the prompt, kept or not); ``decay`` 1 is cumulative history,
   0 this visit only. ``include_current: false`` takes p from earlier visits only (the weight is
   then independent of this visit's rewards) and folds the visit in afterwards;
2. Beta smoothing: ``p = (prior_a + k) / (prior_a + prior_b + n)``, then clipped into
   ``[p_eps, 1 - p_eps]`` so 1/p and 1/sqrt(p(1-p)) stay finite (p = 0.5 if the prior is empty and
   there are no counts);
3. ``w = clip(f'(p), w_min, w_max)``;
4. ``normalize``: the weights are divided by their mean over the step's groups (each prompt counts
   once, as in E_x), so the mean weight in a batch is 1 and the learning rate keeps its meaning.
   Clipping comes first: ``w_max / w_min`` bounds the spread of weights within a batch.

Metrics: ``weight/p_mean``, ``weight/raw_mean`` (before normalisation), ``weight/min``, ``weight/max``
(after), ``weight/clipped_frac``.

The same 1/p must not be applied twice: :func:`check_single_inverse_p` (called at ``setup``) refuses a
recipe in which more than one component declares ``applies_inverse_p`` (a ``log`` f-weight and
Reinforce-Ada-Seq's ``downsample_correct``), with one line naming the field.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from components.callbacks.base import SignalCallback
from components.errors import ConfigError
from components.types import Group

if TYPE_CHECKING:
    from components.handle import StepHandle

F_CHOICES = ("identity", "log", "arcsin", "power", "callable")


def f_weight(f: str, p: float, alpha: float = 0.5) -> float:
    """``f'(p)`` for a named objective (p in (0, 1); the caller clips it away from 0 and 1)."""
    if f == "identity":
        return 1.0
    if f == "log":
        return 1.0 / p
    if f == "arcsin":  # d/dp 2 arcsin(sqrt p) = 1 / sqrt(p (1 - p))
        return 1.0 / math.sqrt(p * (1.0 - p))
    if f == "power":
        return alpha * p ** (alpha - 1.0)
    raise ConfigError("FObjectiveWeights.f", f"unknown objective {f!r}; valid: {list(F_CHOICES)}")


def load_callable(path: str) -> Callable[[float], float]:
    """``pkg.module:fn`` or ``pkg.module.fn`` -> the function (imported, never evaluated as text)."""
    mod_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not mod_name or not attr:
        raise ConfigError("FObjectiveWeights.callable", f"need 'pkg.module:function', got {path!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError("FObjectiveWeights.callable", f"cannot import {path!r} ({e})") from e
    if not callable(fn):
        raise ConfigError("FObjectiveWeights.callable", f"{path!r} is not callable")
    return fn


def smoothed_rate(n: float, k: float, prior_a: float, prior_b: float, eps: float) -> float:
    """Beta-smoothed pass rate ``(a + k) / (a + b + n)``, clipped into ``[eps, 1 - eps]``."""
    den = prior_a + prior_b + n
    p = (prior_a + k) / den if den > 0 else 0.5
    return min(max(p, eps), 1.0 - eps)


def normalise_mean_one(weights: list[float]) -> list[float]:
    """Divide by the mean so the weights average 1 (all-zero weights stay zero)."""
    mean = sum(weights) / len(weights) if weights else 0.0
    return [w / mean for w in weights] if mean > 0 else list(weights)


def _sources(sampler: Any, callbacks: Sequence[Any]) -> list[tuple[str, Any]]:
    """Every component of a run that may set a prompt weight: the sampler chain and the callbacks."""
    out: list[tuple[str, Any]] = []
    s, field = sampler, "model.sampler"
    while s is not None:
        out.append((field, s))
        s, field = getattr(s, "inner", None), field + ".inner"
    out += [("trainer.callbacks", cb) for cb in callbacks]
    return out


def check_single_inverse_p(sampler: Any, callbacks: Sequence[Any]) -> None:
    """Refuse a recipe in which two components apply the log objective's 1/p (ConfigError, one line)."""
    hits = [(field, type(c).__name__) for field, c in _sources(sampler, callbacks) if getattr(c, "applies_inverse_p", False)]
    if len(hits) > 1:
        names = ", ".join(f"{f} ({n})" for f, n in hits)
        raise ConfigError(hits[-1][0], f"1/p would be applied twice, by {names}; keep one source of the 1/p weight")


class FObjectiveWeights(SignalCallback):
    """Prompt weight ``w(p) = f'(p)`` of an f-objective, on ``Group.weight`` (see the module docstring).

    Args:
        f: ``identity``, ``log``, ``arcsin``, ``power`` or ``callable``.
        alpha: the exponent of ``power`` (``J = E[p^alpha]``), in (0, 1].
        callable: import path of ``fn(p) -> w`` when ``f: callable``.
        prior_a, prior_b: Beta prior pseudo-counts of successes and failures (>= 0).
        decay: EMA factor on a prompt's counts per visit, in [0, 1].
        include_current: estimate p with this visit's pool included (default) or from history only.
        p_eps: p is clipped into [p_eps, 1 - p_eps] before f' is taken.
        w_min, w_max: clip range of the raw weight.
        normalize: rescale so the mean weight over the step's groups is 1.
    """

    def __init__(
        self,
        f: str = "log",
        alpha: float = 0.5,
        callable: str | None = None,  # noqa: A002 - the YAML key users write
        prior_a: float = 1.0,
        prior_b: float = 1.0,
        decay: float = 1.0,
        include_current: bool = True,
        p_eps: float = 1e-3,
        w_min: float = 0.0,
        w_max: float = 100.0,
        normalize: bool = True,
    ) -> None:
        pre = "FObjectiveWeights."
        if f not in F_CHOICES:
            raise ConfigError(pre + "f", f"unknown objective {f!r}; valid: {list(F_CHOICES)}")
        if f == "power" and not 0 < alpha <= 1:
            raise ConfigError(pre + "alpha", f"must be in (0, 1] (J = E[p^alpha] concave and increasing), got {alpha}")
        if (f == "callable") != (callable is not None):
            raise ConfigError(pre + "callable", "set it (an import path 'pkg.module:fn') exactly when f is 'callable'")
        if prior_a < 0 or prior_b < 0:
            raise ConfigError(pre + "prior_a", f"Beta prior counts must be >= 0, got ({prior_a}, {prior_b})")
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(pre + "decay", f"must be in [0, 1], got {decay}")
        if not 0.0 < p_eps < 0.5:
            raise ConfigError(pre + "p_eps", f"must be in (0, 0.5), got {p_eps}")
        if not 0.0 <= w_min <= w_max:
            raise ConfigError(pre + "w_max", f"need 0 <= w_min <= w_max, got [{w_min}, {w_max}]")
        self.f, self.alpha, self.callable_path = f, alpha, callable
        self._fn = load_callable(callable) if callable is not None else None
        self.prior_a, self.prior_b, self.decay = prior_a, prior_b, decay
        self.include_current, self.p_eps = include_current, p_eps
        self.w_min, self.w_max, self.normalize = w_min, w_max, normalize
        self.counts: dict[str, list[float]] = {}  # uid -> [n, k], EMA-decayed over visits

    @property
    def applies_inverse_p(self) -> bool:
        """True when this weight is the log objective's 1/p (see :func:`check_single_inverse_p`)."""
        return self.f == "log"

    def weight_of(self, p: float) -> float:
        """``f'(p)`` before clipping and normalisation."""
        if self._fn is not None:
            w = float(self._fn(p))
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"FObjectiveWeights.callable {self.callable_path!r} returned {w} at p={p}: need a finite w >= 0")
            return w
        return f_weight(self.f, p, self.alpha)

    def _visit(self, uid: str, n_drawn: int, n_pos: int) -> None:
        n, k = self.counts.get(uid, (0.0, 0.0))
        self.counts[uid] = [self.decay * n + n_drawn, self.decay * k + n_pos]

    def rate(self, uid: str) -> float:
        n, k = self.counts.get(uid, (0.0, 0.0))
        return smoothed_rate(n, k, self.prior_a, self.prior_b, self.p_eps)

    def weights(self, groups: list[Group]) -> tuple[list[float], dict[str, float]]:
        """The weight of each group (updating the per-prompt counts) and diagnostics."""
        # One visit per uid per step, even when a prompt occurs twice in the batch.
        pooled: dict[str, list[int]] = {}
        for g in groups:
            a = pooled.setdefault(g.prompt.uid, [0, 0])
            a[0] += g.n_drawn if g.n_drawn else g.size
            a[1] += g.n_pos if g.n_drawn else sum(r.passed for r in g.rollouts)
        if self.include_current:
            for uid, (n, k) in pooled.items():
                self._visit(uid, n, k)
        rates = [self.rate(g.prompt.uid) for g in groups]
        if not self.include_current:
            for uid, (n, k) in pooled.items():
                self._visit(uid, n, k)
        raw = [self.weight_of(p) for p in rates]
        clipped = [min(max(w, self.w_min), self.w_max) for w in raw]
        out = normalise_mean_one(clipped) if self.normalize else clipped
        b = max(len(groups), 1)
        info = {
            "p_mean": sum(rates) / b,
            "raw_mean": sum(clipped) / b,
            "min": min(out, default=0.0),
            "max": max(out, default=0.0),
            "clipped_frac": sum(w != c for w, c in zip(raw, clipped, strict=True)) / b,
        }
        return out, info

    # ---- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_single_inverse_p(getattr(pl_module, "sampler", None), trainer.callbacks)

    def on_groups(self, groups: list[Group], handle: StepHandle) -> list[Group]:
        if not groups:
            return groups
        ws, info = self.weights(groups)
        for g, w in zip(groups, ws, strict=True):
            g.weight = g.weight * w
        for k, v in info.items():
            handle.log(f"weight/{k}", v)
        return groups

    # ---- checkpointed state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"counts": {uid: [float(n), float(k)] for uid, (n, k) in self.counts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {str(uid): [float(n), float(k)] for uid, (n, k) in state.get("counts", {}).items()}
