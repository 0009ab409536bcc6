"""Bias of Reinforce-Ada-Seq's downsample-correct gradient estimate, against pool size.

A one-parameter Bernoulli policy (logit theta, pass rate p): grad log pi(a) = a - p, and the log
objective's gradient is d/dtheta log p = 1 - p. Each trial runs the real ``ReinforceAdaSeq`` sampler
with ``downsample_correct: true`` on scripted Bernoulli rewards and the real ``pool_mean`` estimator,
and forms the gradient the loss would see, ``(1/n) sum_kept A_i w_i W_g (a_i - p)``. Two versions:

- ``known``: baseline and 1/p from the true p (only the selection weights from the sampler);
- ``estimated``: baseline p~ and weight 1/p~ from the pool, as in training (p~ = 0 gives weight 0).

The pool is one round of M samples (``--pools``; fixed |S| = M) or, with ``--rounds R``, up to R rounds
of M with the balanced exit rule (|S| is then a stopping time). Prints mean, standard error, bias
and relative bias per (p, pool). Example:

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/downsample_correct_bias.py --trials 4000
"""

from __future__ import annotations

import argparse
import math

import torch

from components.algos.advantages import pool_mean_advantage
from components.samplers.ada_seq import ReinforceAdaSeq
from tests.fakes import ScriptedContext, make_prompts


def estimate(p: float, round_size: int, rounds: int, trials: int, seed: int, n: int = 4) -> dict[str, tuple[float, float]]:
    """Mean and standard error of the known-p and estimated-p~ gradient estimates."""
    (prompt,) = make_prompts(1)
    s = ReinforceAdaSeq(n=n, round_size=round_size, max_rounds=rounds, downsample_correct=True)
    ctx = ScriptedContext(pass_rates={prompt.uid: p}, seed=seed)
    groups = [s.collect([prompt], ctx)[0] for _ in range(trials)]
    r = torch.tensor([x for g in groups for x in g.rewards], dtype=torch.double)
    grp = torch.tensor([i for i, g in enumerate(groups) for _ in g.rollouts])
    rw = torch.tensor([x.weight for g in groups for x in g.rollouts], dtype=torch.double)
    out = {}
    for name, base, w in (
        ("known", [p] * trials, [1 / p] * trials),
        ("estimated", [g.baseline for g in groups], [g.weight for g in groups]),
    ):
        adv = pool_mean_advantage(r, grp, baseline=torch.tensor(base, dtype=torch.double)).double()
        row = adv * torch.tensor(w, dtype=torch.double)[grp] * rw * (r - p) / n
        per = torch.zeros(trials, dtype=torch.double).index_add_(0, grp, row)
        out[name] = (float(per.mean()), float(per.std() / math.sqrt(trials)))
    out["pool"] = (sum(g.n_drawn for g in groups) / trials, 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.1, 0.3, 0.5])
    ap.add_argument("--pools", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="round size M")
    ap.add_argument("--rounds", type=int, default=1, help="max rounds (1: fixed pool of M)")
    ap.add_argument("--trials", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"n=4, rounds={args.rounds}, trials={args.trials}, seed={args.seed}; target = 1 - p")
    print(
        f"{'p':>5} {'M':>4} {'E|S|':>6} | {'known':>8} {'bias':>8} {'se':>6} | {'estimated':>9} {'bias':>8} {'rel':>7} {'se':>6}"
    )
    for p in args.rates:
        for m in args.pools:
            e = estimate(p, m, args.rounds, args.trials, args.seed)
            (km, ks), (em, es) = e["known"], e["estimated"]
            t = 1 - p
            print(
                f"{p:5.2f} {m:4d} {e['pool'][0]:6.1f} | {km:8.4f} {km - t:+8.4f} {ks:6.4f} | "
                f"{em:9.4f} {em - t:+8.4f} {(em - t) / t:+7.1%} {es:6.4f}"
            )


if __name__ == "__main__":
    main()
