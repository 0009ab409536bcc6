"""Held-out evaluation cost: today's default (300 items x 4 samples through transformers' ``generate``)
against 4x the items (1,200 x 4) through the HF engine's decode loop, in one process.

Both go through :class:`~components.step.evaluation.Evaluator` in the 256-item slices the module
evaluates in, on the embedded tiny model (8 new tokens, T=1, one thread). Blocks alternate between
the two (``--rounds`` each) so that load from other processes hits both alike; the script prints
each block's wall time, the generate and scoring parts, and the ratio of the medians:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python scripts/bench_eval.py
    python scripts/bench_eval.py --rounds 5 --big 1200 --small 300
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=300, help="held-out items of today's evaluation")
    ap.add_argument("--big", type=int, default=1200, help="held-out items of the new evaluation")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="alternating blocks per side")
    ap.add_argument("--model", default="embedded:tiny")
    ap.add_argument("--slice", type=int, default=256, help="items per evaluation call of the new side (today's: 256)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from components.data.datamodule import PromptDataModule
    from components.engines.base import SamplingParams
    from components.engines.hf import HFEngine
    from components.engines.hf_generate import HFGenerateEngine
    from components.policy import encode_prompt, load_policy
    from components.rewards.verifier import VerifierReward
    from components.step.evaluation import EvalConfig, Evaluator

    model, tok = load_policy(args.model)
    params = SamplingParams(1.0, 1.0, args.new_tokens)
    sides = {}
    for name, n_items, engine in (("today", args.small, HFGenerateEngine()), ("new", args.big, HFEngine())):
        dm = PromptDataModule(heldout_size=n_items)
        dm.setup("fit")
        reward = VerifierReward()
        reward.setup(SimpleNamespace(sampling=params), dm.verifier)
        engine.bind(model, tok)
        held = dm.heldout
        ctxs = [encode_prompt(tok, p.text) for p in held]
        sides[name] = (held, ctxs, engine, reward)

    def block(name: str) -> dict[str, float]:
        held, ctxs, engine, reward = sides[name]
        spent = {"generate": 0.0, "scoring": 0.0}
        gen, score = engine.generate, reward.score

        def timed_gen(*a, **k):
            t0 = time.perf_counter()
            try:
                return gen(*a, **k)
            finally:
                spent["generate"] += time.perf_counter() - t0

        def timed_score(*a, **k):
            t0 = time.perf_counter()
            try:
                return score(*a, **k)
            finally:
                spent["scoring"] += time.perf_counter() - t0

        engine.generate, reward.score = timed_gen, timed_score
        ev = Evaluator(EvalConfig(samples=args.samples))
        t0 = time.perf_counter()
        step = 256 if name == "today" else args.slice  # the module's slices (val_dataloader's batch size)
        for s in range(0, len(held), step):
            ev.run(held[s : s + step], ctxs[s : s + step], engine, reward, params)
        res = ev.results()
        spent["total"] = time.perf_counter() - t0
        del engine.generate, reward.score
        spent["pass_at_1"] = res["eval/pass_at_1"]
        return spent

    block("today"), block("new")  # warm-up
    rows: dict[str, list[dict[str, float]]] = {"today": [], "new": []}
    for r in range(args.rounds):
        for name in ("today", "new") if r % 2 == 0 else ("new", "today"):
            rows[name].append(block(name))
            b = rows[name][-1]
            print(
                f"round {r} {name:>5}: total {b['total']:.2f} s (generate {b['generate']:.2f}, "
                f"scoring {b['scoring']:.3f}) pass@1 {b['pass_at_1']:.3f}",
                flush=True,
            )
    med = {n: {k: statistics.median(b[k] for b in v) for k in v[0]} for n, v in rows.items()}
    ratios = [n["total"] / t["total"] for n, t in zip(rows["new"], rows["today"])]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.model}, {args.new_tokens} new tokens, {args.samples} samples, 1 thread, {args.rounds} interleaved "
        f"rounds, load average {load:.1f}"
    )
    for n, label in (("today", f"{args.small} x {args.samples}, generate"), ("new", f"{args.big} x {args.samples}, decode loop")):
        m = med[n]
        print(f"  {label:<28} median {m['total']:.2f} s (generate {m['generate']:.2f}, scoring {m['scoring']:.3f})")
    print(f"per-round ratios new / today: {' '.join(f'{x:.2f}' for x in ratios)}")
    print(f"evaluation cost ratio ({args.big} x {args.samples} new) / ({args.small} x {args.samples} today): "
          f"{med['new']['total'] / med['today']['total']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
