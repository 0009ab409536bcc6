"""Step-time breakdown of the training step on the embedded default.

Runs real training steps (tiny model, default task mix, a recipe of your choice) under the
Lightning Trainer with timers wrapped around each phase, and prints milliseconds per step and
each phase's share of the step:

    python scripts/bench_step.py                       # recipes/grpo.yaml, 20 steps after 3 warm-up
    python scripts/bench_step.py --recipe recipes/dapo.yaml --steps 30
    python scripts/bench_step.py -- --model.shared_prompt false     # anything after -- goes to the CLI

Phases: generate (engine), scoring (verifier), log-prob forward (every policy forward outside
generation: the loss's, old/reference log-prob passes, auxiliary passes such as GVM's gradient norms),
backward, optimizer (step + zero_grad + grad clip; every mini-batch update), everything else (sampler
logic, batching, advantages, metrics, Lightning overhead).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class _Timer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.active = False

    def wrap(self, obj: object, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if self.active:
                    self.totals[phase] += time.perf_counter() - t0

        setattr(obj, name, timed)


class _StepClock(L.Callback):
    def __init__(self, timer: _Timer, warmup: int) -> None:
        self.timer, self.warmup, self.steps, self.total = timer, warmup, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.timer.active = trainer.global_step >= self.warmup
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.timer.active:
            self.total += time.perf_counter() - self.t0
            self.steps += 1

    def on_train_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        for name in ("step", "zero_grad"):
            self.timer.wrap(opt, name, "optimizer")
        self.timer.wrap(pl_module, "clip_gradients", "optimizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "grpo.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("cli_args", nargs="*", help="extra curate-rl CLI arguments (after --)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from components.cli import build_cli

    timer = _Timer()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        cli = build_cli(
            [
                "--config",
                args.recipe,
                "--trainer.max_steps",
                str(args.steps + args.warmup),
                "--trainer.logger",
                "false",
                "--trainer.val_check_interval",
                "100000",
                "--model.eval.at_start",
                "false",
                "--model.export_dir",
                "null",
                "--checkpoint.every_n_train_steps",
                "100000",
                "--trainer.enable_progress_bar",
                "false",
                *args.cli_args,
            ],
            run=False,
        )
        m = cli.model
        timer.wrap(m.engine, "generate", "generate")
        timer.wrap(m.reward, "score", "scoring")
        timer.wrap(m, "forward_logprobs", "log-prob forward")
        timer.wrap(m, "manual_backward", "backward")
        clock = _StepClock(timer, args.warmup)
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(m, datamodule=cli.datamodule)
    n = max(clock.steps, 1)
    total = clock.total / n
    print(f"recipe: {Path(args.recipe).name}   steps timed: {clock.steps}   torch threads: {torch.get_num_threads()}")
    print(
        f"rollouts/step: {m.cumulative['rollouts'] / (args.steps + args.warmup):.0f}   "
        f"tokens/step: {m.cumulative['tokens'] / (args.steps + args.warmup):.0f}"
    )
    print(f"{'phase':<20}{'ms/step':>10}{'share':>9}")
    phases = ["generate", "scoring", "log-prob forward", "backward", "optimizer"]
    accounted = 0.0
    for p in phases:
        v = timer.totals[p] / n
        accounted += v
        print(f"{p:<20}{v * 1000:>10.1f}{v / total:>9.1%}")
    other = total - accounted
    print(f"{'everything else':<20}{other * 1000:>10.1f}{other / total:>9.1%}")
    print(f"{'total':<20}{total * 1000:>10.1f}{1:>9.1%}")


if __name__ == "__main__":
    main()
