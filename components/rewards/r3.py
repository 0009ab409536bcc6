"""DRO's R3 reward (Reasoning Reflection Reward; Xu et al. 2025, arXiv 2506.13351v1 §4.1).

R3 rewards a chain of thought by how much it makes the *reference answer* likely, with no verifier
in the training signal. For the G rollouts ``o_i = (c_i, y^_i)`` of one prompt:

    l_ij  = log pi_rwd( y_j | q, c_i, y_<j )         teacher-forced reference answer y = y_1..y_L
    s_j   = std_i l_ij                                population std over the group's rollouts
    w     = w(s)                                      shared by every rollout of the group
    R3_i  = sum_j w_j l_ij

The generated answer y^_i is thrown away for R3 (only the reasoning c_i conditions the reference).
Tokens with a large spread s_j are the "reasoning-reflective" tokens: the ones whose likelihood
depends on which reasoning came before.

Choices this module makes (the paper leaves them open; algorithms.md §2a marks them UNVERIFIED):

- ``weighting``: the paper only says w "assigns greater weight to tokens with higher s_j". Ours:
  ``linear`` (default) w_j = max(s_j, eps) / sum_k max(s_k, eps); ``power`` the same with
  max(s, eps)^gamma; ``softmax`` softmax(s / tau). The eps floor keeps a group whose reasonings
  barely differ (all s ~ 0) well defined: its weights become uniform. ``aggr`` is the paper's
  DRO-Aggr ablation: every weight 1, R = sum_j l_ij.
- ``reward_policy``: the paper names three (frozen initial policy, policy kept in sync, a lagged
  copy) and does not say which its main runs use, so the default is ``frozen``.
- The propagation-aware correction (§4.1.3) is optional; which tokens count as reflective
  (``top_frac`` of tokens by s) and its decay ``gamma`` are our parameters.
- The masked-CoT baseline (§4.1.3) subtracts a term that does not depend on the rollout: it shifts
  every R3_i of a prompt by one constant and cancels exactly under group mean-centring (and std
  scaling), so it is not built.
- ``eos``: the teacher-forced target is the reference answer followed by EOS, so "46" is not
  rewarded for a reasoning that leads to "460" (ours; set ``eos: false`` for the paper's y alone).
- The length penalty r_len = 1 - beta_len * | |y| - |y^| | / |y| on the generated answer and its
  combination r = lam * R3 + (1 - lam) * r_len are options (lam = ``r3_weight`` = 1 by default:
  the paper's weights are not given).

The task's verifier is evaluation only: it sets ``Rollout.passed`` (gate statistics, held-out
pass@1) and is compared with R3 every step (``dro/r3_verifier_corr``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from components.errors import ConfigError
from components.rewards.verifier import Reward, extract_answer
from components.types import Prompt, Rollout

if TYPE_CHECKING:
    from components.handle import StepHandle

WEIGHTINGS = ("linear", "power", "softmax", "aggr")


# ---- pure tensor functions -----------------------------------------------------------------------
def token_spread(logp: torch.Tensor) -> torch.Tensor:
    """s_j: population std over rollouts (dim 0) of the reference-token log-probs ``(G, L)``.
    A group of one rollout has s = 0."""
    return logp.std(dim=0, unbiased=False) if logp.shape[0] > 1 else torch.zeros_like(logp[0])


def reflectivity_weights(
    sigma: torch.Tensor, form: str = "linear", eps: float = 1e-4, gamma: float = 2.0, tau: float = 1.0
) -> torch.Tensor:
    """Token weights w(s) ``(L,)``: they sum to 1, except ``aggr`` (all ones, DRO-Aggr)."""
    if form == "aggr":
        return torch.ones_like(sigma)
    if form == "softmax":
        return torch.softmax(sigma / tau, dim=-1)
    s = sigma.clamp(min=eps)
    if form == "power":
        s = s**gamma
    elif form != "linear":
        raise ConfigError("model.reward.weighting", f"unknown weighting {form!r}; valid: {list(WEIGHTINGS)}")
    return s / s.sum()


def propagation_correction(logp: torch.Tensor, sigma: torch.Tensor, top_frac: float, gamma: float) -> torch.Tensor:
    """The additive log-correction ``(G, L)`` of the propagation-aware R3 (paper v1 §4.1.3).

    For a reflective token k with probability p_k = exp(l_ik) under rollout i's reasoning, a later
    token j > k is credited only P_k(j) = p_k + (1 - p_k)(1 - exp(-gamma (j - k))): once the
    reference forced token k, tokens right after it are easy whatever the reasoning was, so their
    likelihood is discounted by how little the reasoning itself predicted k. The correction of
    token j is sum over reflective k < j of log P_k(j) (<= 0). Reflective tokens: the
    ceil(top_frac * L) tokens with the largest s (ours; the paper gives no rule).
    """
    G, L = logp.shape
    n_top = max(1, math.ceil(top_frac * L))
    top = torch.topk(sigma, min(n_top, L)).indices
    j = torch.arange(L, dtype=logp.dtype)
    corr = torch.zeros_like(logp)
    for k in top.tolist():
        p_k = logp[:, k].exp().unsqueeze(1)  # (G, 1)
        d = (j - k).clamp(min=0)
        decay = 1 - torch.exp(-gamma * d)  # (L,)
        P = p_k + (1 - p_k) * decay
        later = (j > k).to(logp.dtype)
        corr = corr + later * torch.log(P.clamp(min=1e-30))
    return corr


def r3_scores(
    logp: torch.Tensor,
    form: str = "linear",
    eps: float = 1e-4,
    gamma: float = 2.0,
    tau: float = 1.0,
    propagation: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R3 of one group: ``logp`` ``(G, L)`` -> (R3 ``(G,)``, weights ``(L,)``, s ``(L,)``).

    ``propagation`` = (top_frac, gamma) applies the propagation-aware correction to the log-probs
    that are weighted (the weights and s come from the uncorrected log-probs).
    """
    sigma = token_spread(logp)
    w = reflectivity_weights(sigma, form, eps, gamma, tau)
    scored = logp if propagation is None else logp + propagation_correction(logp, sigma, *propagation)
    return scored @ w, w, sigma


def length_reward(gen_len: int, ref_len: int, beta: float) -> float:
    """r_len = 1 - beta * | |y| - |y^| | / |y| on the generated answer's length (paper v1 §4.2.1)."""
    return 1.0 - beta * abs(ref_len - gen_len) / max(ref_len, 1)


def worst_rank_score(ranks: torch.Tensor, rho: float) -> torch.Tensor:
    """The query filter's s_i: the mean of the worst (largest) ceil(rho * L) ranks of each trace's
    reference tokens; ``ranks`` ``(N, L)`` with 0 = the model's top-1 token."""
    k = max(1, math.ceil(rho * ranks.shape[-1]))
    return torch.topk(ranks.to(torch.float), min(k, ranks.shape[-1]), dim=-1).values.mean(-1)


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation, or None when either side has no spread."""
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x)
    vy = sum((b - my) ** 2 for b in y)
    if vx <= 1e-12 or vy <= 1e-12:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(vx * vy)


@torch.no_grad()
def teacher_force(
    model: torch.nn.Module,
    prefixes: list[list[int]],
    target: list[int],
    pad_id: int,
    micro_batch_rows: int = 64,
    ranks: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``(N, L)`` of ``target`` after each prefix, in batched forwards (and, with
    ``ranks``, each target token's rank in the predicted distribution: 0 = top-1).

    Every row is left-padded ``prefix + target``, so the target fills the last L positions of every
    row and one slice reads all of them.
    """
    L = len(target)
    lps, rks = [], []
    for start in range(0, len(prefixes), micro_batch_rows):
        chunk = prefixes[start : start + micro_batch_rows]
        W = max(len(p) for p in chunk) + L
        ids = torch.full((len(chunk), W), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), W), dtype=torch.long)
        for i, p in enumerate(chunk):
            row = p + target
            ids[i, W - len(row) :] = torch.tensor(row, dtype=torch.long)
            att[i, W - len(row) :] = 1
        ids, att = ids.to(device), att.to(device)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, W - L - 1 : W - 1].float()
        tgt = ids[:, W - L :]
        logp_all = torch.log_softmax(logits, dim=-1)
        lps.append(logp_all.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).cpu())
        if ranks:
            chosen = logits.gather(-1, tgt.unsqueeze(-1))
            rks.append((logits > chosen).sum(-1).cpu())
    return torch.cat(lps), (torch.cat(rks) if ranks else None)


# ---- the reward component ------------------------------------------------------------------------
@dataclass
class Propagation:
    """Options of the propagation-aware correction (ours: the paper gives neither value)."""

    top_frac: float = 0.25  # share of reference tokens (largest s) treated as reflective
    gamma: float = 1.0  # decay per token of distance


@dataclass
class Split:
    """One rollout cut at the answer marker."""

    reasoning: str
    answer: str
    has_marker: bool


def split_at_marker(text: str, marker: str) -> Split:
    """Reasoning = text before the *last* marker, answer = text after it (the reasoning regime's
    verifier reads the text after the last marker too: ``components.data.tasks.split_completion``).
    No marker: the whole text is reasoning and the answer is empty (the reasoning was never closed)."""
    i = text.rfind(marker)
    if i < 0:
        return Split(text, "", False)
    return Split(text[:i], text[i + len(marker) :], True)


class R3Reward(Reward):
    """DRO's R3 as the training reward; the task's verifier is kept for evaluation only.

    Args:
        marker: the answer marker that ends the reasoning (e.g. ``"####"``); a prompt's own
            ``answer_marker`` field wins when the task sets one ("" : only the task's). A plain
            ``str`` on purpose: with ``str | None`` jsonargparse reads "####" as a YAML comment.
        target: what is teacher-forced: ``reference`` (the text after the last marker of the
            prompt's reference solution, or the whole reference when it has none) or ``answer``
            (the gold answer).
        weighting: ``linear`` | ``power`` | ``softmax`` | ``aggr`` (DRO-Aggr); see the module doc.
        eps: floor on s in ``linear`` and ``power``.
        gamma: exponent of ``power``.
        tau: temperature of ``softmax``.
        eos: append EOS to the teacher-forced target.
        reward_policy: ``frozen`` (initial policy, default), ``current`` (the policy as it is),
            ``lagged`` (a copy refreshed every ``lag_steps`` steps).
        lag_steps: refresh period of ``lagged``.
        r3_weight: lam in r = lam * R3 + (1 - lam) * r_len.
        len_beta: beta_len of the length penalty on the generated answer.
        propagation: the propagation-aware correction (None: off).
        verify_on: what the evaluation verifier reads: ``completion`` (the whole text through
            ``extract``, as the verifier reward gives it; worked-steps tasks find their own marker)
            or ``answer`` (only the text after the marker).
        extract: extractor applied to the verifier's input (see ``rewards.extract_answer``).
        micro_batch_rows: rows per scoring forward.
    """

    def __init__(
        self,
        marker: str = "",
        target: Literal["reference", "answer"] = "reference",
        weighting: Literal["linear", "power", "softmax", "aggr"] = "linear",
        eps: float = 1e-4,
        gamma: float = 2.0,
        tau: float = 1.0,
        eos: bool = True,
        reward_policy: Literal["frozen", "current", "lagged"] = "frozen",
        lag_steps: int = 50,
        r3_weight: float = 1.0,
        len_beta: float = 0.0,
        propagation: Propagation | None = None,
        verify_on: Literal["answer", "completion"] = "completion",
        extract: Literal["strip", "answer_tag", "last_line"] = "strip",
        micro_batch_rows: int = 64,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ConfigError("model.reward.weighting", f"{weighting!r} is not one of {list(WEIGHTINGS)}")
        if target not in ("reference", "answer"):
            raise ConfigError("model.reward.target", f"{target!r} is not one of 'reference', 'answer'")
        if reward_policy not in ("frozen", "current", "lagged"):
            raise ConfigError("model.reward.reward_policy", f"{reward_policy!r} is not one of 'frozen', 'current', 'lagged'")
        if verify_on not in ("answer", "completion"):
            raise ConfigError("model.reward.verify_on", f"{verify_on!r} is not one of 'answer', 'completion'")
        for name, v in (("eps", eps), ("tau", tau), ("lag_steps", lag_steps), ("micro_batch_rows", micro_batch_rows)):
            if not v > 0:
                raise ConfigError(f"model.reward.{name}", f"must be > 0, got {v}")
        if not 0.0 <= r3_weight <= 1.0:
            raise ConfigError("model.reward.r3_weight", f"must be in [0, 1], got {r3_weight}")
        extract_answer("", extract)
        self.marker, self.target, self.weighting = marker, target, weighting
        self.eps, self.gamma, self.tau, self.eos = eps, gamma, tau, eos
        self.reward_policy, self.lag_steps = reward_policy, lag_steps
        self.r3_weight, self.len_beta, self.propagation = r3_weight, len_beta, propagation
        self.verify_on, self.extract, self.micro_batch_rows = verify_on, extract, micro_batch_rows
        self.handle: StepHandle | None = None
        self._rwd_model: torch.nn.Module | None = None
        self._rwd_step = -1
        self._acc_step = -1
        self._acc: dict[str, float] = {}

    # ---- setup and validation -----------------------------------------------------------------
    def setup(self, handle: StepHandle, verifier_of: Callable[[Prompt], Callable[[str, Prompt], float]]) -> None:
        super().setup(handle, verifier_of)
        if self.reward_policy == "frozen":
            ref = handle.ref_policy  # the KL reference is the same frozen initial policy
            self._rwd_model = ref if ref is not None else copy.deepcopy(handle.policy).eval().requires_grad_(False)
        self.validate(handle.train_prompts())

    def marker_of(self, prompt: Prompt) -> str:
        m = getattr(prompt, "answer_marker", None) or self.marker
        if not m:
            raise ConfigError("model.reward.marker", f"no answer marker: task {prompt.task!r} sets none; set model.reward.marker")
        return m

    def target_text(self, prompt: Prompt) -> str:
        """The reference answer y that is teacher-forced (text)."""
        if self.target == "answer":
            return prompt.answer
        ref = prompt.reference
        if ref is None or not str(ref).strip():
            raise ConfigError(
                "data.files.reference_field",
                f"prompt uid={prompt.uid} of task {prompt.task!r} has no reference answer, which R3 "
                "(model.reward: R3Reward) teacher-forces: point reference_field at a field holding it, or set model.reward.target: answer",
            )
        ref = str(ref)
        m = self.marker_of(prompt)
        return ref[ref.rfind(m) + len(m) :] if m in ref else ref

    def _encode(self, text: str) -> list[int]:
        return list(self.handle.tokenizer(text, add_special_tokens=False).input_ids)

    def target_ids(self, prompt: Prompt) -> list[int]:
        ids = self._encode(self.target_text(prompt))
        if self.eos and self.handle.tokenizer.eos_token_id is not None:
            ids.append(self.handle.tokenizer.eos_token_id)
        if not ids:
            raise ConfigError("model.reward.target", f"prompt uid={prompt.uid}: the reference answer is empty")
        return ids

    def validate(self, prompts: list[Prompt]) -> None:
        """One-line errors for data R3 cannot score: a missing reference, a marker the tokenizer
        cannot write, or a prompt whose context + reasoning + reference exceed the model's positions."""
        tok = self.handle.tokenizer
        max_pos = getattr(getattr(self.handle.policy, "config", None), "max_position_embeddings", None)
        for m in {self.marker_of(p) for p in prompts} | ({self.marker} if self.marker else set()):
            ids = self._encode(m)
            if not ids or tok.unk_token_id in ids or tok.decode(ids) != m:
                raise ConfigError(
                    "model.reward.marker", f"the tokenizer cannot write the answer marker {m!r} (it encodes to {ids})"
                )
        for p in prompts:
            y = self.target_ids(p)
            need = len(self.handle.context_of(p)) + self.max_new_tokens + len(self._encode(self.marker_of(p))) + len(y)
            if max_pos is not None and need > max_pos:
                raise ConfigError(
                    "model.reward.target",
                    f"prompt uid={p.uid}: context + max_new_tokens + marker + reference answer ({len(y)} tokens) "
                    f"= {need} tokens, longer than the model's context of {max_pos}; shorten the reference or max_new_tokens",
                )

    # ---- scoring --------------------------------------------------------------------------------
    def reward_model(self) -> torch.nn.Module:
        m = self.handle
        if self.reward_policy == "current":
            return m.policy
        if self.reward_policy == "lagged" and (self._rwd_model is None or m.step - self._rwd_step >= self.lag_steps):
            if self._rwd_model is None:
                self._rwd_model = copy.deepcopy(m.policy).eval().requires_grad_(False)
            else:
                self._rwd_model.load_state_dict(m.policy.state_dict())
            self._rwd_step = m.step
        # The copy is not a registered submodule (Lightning does not move it): follow the policy.
        p = next(self._rwd_model.parameters(), None)
        if p is not None and p.device != torch.device(m.device):
            self._rwd_model.to(m.device)
        return self._rwd_model

    def _verify(self, prompt: Prompt, rollouts: list[Rollout], splits: list[Split]) -> None:
        verify = self.verifier_of(prompt)
        for r, s in zip(rollouts, splits):
            text = s.answer if self.verify_on == "answer" else r.text
            answer = extract_answer(text, self.extract)
            try:
                r.passed = float(verify(answer, prompt)) >= 1.0
            except Exception as e:
                raise RuntimeError(
                    f"verifier of task {prompt.task!r} raised on uid={prompt.uid} with answer {answer!r}: {e}"
                ) from e

    def group_logprobs(self, prompt: Prompt, splits: list[Split], model: torch.nn.Module | None = None, ranks: bool = False):
        """Teacher-forced log-probs ``(G, L)`` of the reference after each rollout's reasoning
        (and ranks with ``ranks``), the target ids, and the number of tokens forwarded."""
        ctx = self.handle.context_of(prompt)
        marker_ids = self._encode(self.marker_of(prompt))
        y = self.target_ids(prompt)
        prefixes = [ctx + self._encode(s.reasoning) + marker_ids for s in splits]
        lp, rk = teacher_force(
            model if model is not None else self.reward_model(),
            prefixes,
            y,
            self.handle.tokenizer.pad_token_id,
            self.micro_batch_rows,
            ranks=ranks,
            device=self.handle.device,
        )
        return lp, rk, y, sum(len(p) + len(y) for p in prefixes)

    def score(self, prompt: Prompt, rollouts: list[Rollout]) -> None:
        """One prompt's rollouts are one group: s_j and the weights come from them together."""
        marker = self.marker_of(prompt)
        splits = [split_at_marker(r.text, marker) for r in rollouts]
        self._verify(prompt, rollouts, splits)
        if not rollouts:
            return
        if not torch.is_grad_enabled():
            # Held-out evaluation (the module's no-grad path) reads only the verifier.
            for r in rollouts:
                r.reward = float(r.passed)
            return
        t0 = time.perf_counter()
        logp, _, y, n_fwd = self.group_logprobs(prompt, splits)
        prop = None if self.propagation is None else (self.propagation.top_frac, self.propagation.gamma)
        r3, w, sigma = r3_scores(logp, self.weighting, self.eps, self.gamma, self.tau, prop)
        ref_len = len(self._encode(self.target_text(prompt).strip()))  # both answers compared stripped
        y_toks = [self.handle.tokenizer.decode([t]) for t in y]
        shown = " ".join(f"{t!r}:{float(x):.2f}" for t, x in zip(y_toks, w))
        for i, (r, s) in enumerate(zip(rollouts, splits)):
            gen_len = len(self._encode(s.answer.strip())) if s.has_marker else 0
            r.reward = self.r3_weight * float(r3[i])
            if self.r3_weight < 1.0:
                r.reward += (1 - self.r3_weight) * length_reward(gen_len, ref_len, self.len_beta)
            r.meta["r3"] = round(float(r3[i]), 4)
            r.meta["r3_token_weights"] = shown
            r.meta["r3_max_sigma"] = float(sigma.max())
        self._record(rollouts, splits, r3, sigma, w, n_fwd, time.perf_counter() - t0)

    # ---- metrics --------------------------------------------------------------------------------
    def _record(self, rollouts, splits, r3, sigma, w, n_fwd, seconds) -> None:
        m = self.handle
        if m.step != self._acc_step:
            self._acc_step, self._acc = m.step, {}
        a = self._acc
        G = len(rollouts)

        def add(k: str, v: float) -> None:
            a[k] = a.get(k, 0.0) + v

        add("groups", 1)
        add("rollouts", G)
        add("r3_sum", float(r3.sum()))
        add("r3_std_sum", float(r3.std(unbiased=False)) if G > 1 else 0.0)
        add("sigma_max_sum", float(sigma.max()))
        add("no_marker", sum(not s.has_marker for s in splits))
        add("reasoning_len_sum", sum(len(self._encode(s.reasoning)) for s in splits))
        add("w_max_sum", float(w.max() / w.sum()))
        c = pearson([float(x) for x in r3], [float(r.passed) for r in rollouts])
        if c is not None:
            add("corr_sum", c)
            add("corr_n", 1)
        n = max(a["rollouts"], 1)
        m.log("dro/r3_mean", a["r3_sum"] / n)
        m.log("dro/r3_std", a["r3_std_sum"] / a["groups"])
        m.log("dro/sigma_max_mean", a["sigma_max_sum"] / a["groups"])
        m.log("dro/weight_max_mean", a["w_max_sum"] / a["groups"])
        m.log("dro/no_marker", a["no_marker"])
        m.log("dro/no_marker_frac", a["no_marker"] / n)
        m.log("dro/reasoning_len", a["reasoning_len_sum"] / n)
        # NaN when no group had spread in both R3 and the verifier (logged every step all the same:
        # Lightning repeats the last value of a key a step leaves out).
        m.log("dro/r3_verifier_groups", a.get("corr_n", 0.0))
        m.log("dro/r3_verifier_corr", a["corr_sum"] / a["corr_n"] if a.get("corr_n") else math.nan)
        m.add_metrics({"budget/tokens_forwarded": n_fwd, "dro/tokens_forwarded": n_fwd, "time/r3_s": seconds})
