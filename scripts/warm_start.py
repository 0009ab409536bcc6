"""Warm-start a char-level Llama by supervised training on any task mix, stopping at a target pass rate.

RL sharpens what supervised training half-learned. This trains a fresh model on some slices of a
task mix and stops once the sampled (T=1) pass rate on held-out items of one slice reaches
``--target``. With no arguments it rebuilds the shipped model: the default mix's 1- and 2-digit
items (never the 3-digit ones, which stay unsolved), stopped at 2-digit pass rate 0.22:

    python scripts/warm_start.py --out components/assets/tiny

The shipped model came from that command: it stopped after 2,400 steps (about 5.5 minutes on an
idle core) at held-out sampled pass@1 d1 0.91, d2 0.24. Other mixes and formats:

    # worked-steps answers (the reasoning regime's task), a larger model, a lower target
    python scripts/warm_start.py --tasks reasoning --target 0.25 --max-positions 128 --out /tmp/m
    # any reasoning-gym or local task mix, as YAML/JSON (a list of data.tasks entries) ...
    python scripts/warm_start.py --tasks '[{name: column_sum, config: {digits: 2}, tag: d2}]' --target-tag d2
    # ... or a file holding it (what `curate-rl fit --data.tasks` takes), or a config/regime file with data.tasks
    python scripts/warm_start.py --tasks my_mix.yaml --target-tag easy --out .cache/my_model

``--train-tags`` defaults to d1,d2 on the named mixes (the shipped models never train on 3-digit
items) and to every slice on any other mix. The build saves its state at every evaluation: the
same command again resumes an interrupted build. ``<out>/warm_start.json`` records how the model
was built (spec, seed, steps, data). A named regime (one file in configs/regimes/, its warm start
in its header) is built and cached by ``scripts/build_regime.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from components.analysis.warm_start import MODEL_SIZES, WarmStartSpec, warm_start
from components.data.datamodule import ReasoningGymTask, default_tasks, reasoning_tasks
from components.errors import ConfigError

NAMED_MIXES = {"default": default_tasks, "reasoning": reasoning_tasks}
NAMED_TRAIN_TAGS = ["d1", "d2"]  # the named mixes: as the shipped models, 3-digit items are never trained on


def parse_tasks(text: str) -> list[ReasoningGymTask]:
    """A named mix (``default``, ``reasoning``); a file holding a YAML/JSON list of ``data.tasks``
    entries, or a config (a regime file) whose ``data.tasks`` is one; or such a list inline."""
    if text in NAMED_MIXES:
        return NAMED_MIXES[text]()
    path = Path(text)
    entries = yaml.safe_load(path.read_text() if path.is_file() else text)
    if isinstance(entries, dict) and isinstance(entries.get("data"), dict) and "tasks" in entries["data"]:
        entries = entries["data"]["tasks"]
        if entries is None:  # a config on the default mix (e.g. configs/regimes/dense.yaml)
            return default_tasks()
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        where = f"the file {text}" if path.is_file() else repr(text)
        raise SystemExit(
            f"warm_start: --tasks: expected {sorted(NAMED_MIXES)}, a YAML list of task entries, or a file holding one "
            f"(or a config with data.tasks); got {where}"
        )
    try:
        return [ReasoningGymTask(**e) for e in entries]
    except TypeError as e:
        raise SystemExit(f"warm_start: --tasks: {e}; entry keys: name, config, weight, tag, prompt_template") from None


def train_tags(arg: str | None, mix: str, tasks: list[ReasoningGymTask]) -> list[str] | None:
    """``--train-tags``: given (comma-separated, '' = all), else d1,d2 on a named mix and every slice on another."""
    if arg is None:
        return NAMED_TRAIN_TAGS if mix in NAMED_MIXES else None
    return [t for t in arg.split(",") if t] or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="components/assets/tiny")
    ap.add_argument(
        "--tasks", default="default", help="a named mix (default, reasoning), a file of data.tasks entries, or the list inline"
    )
    ap.add_argument(
        "--train-tags", default=None, help="comma-separated slices to train on ('' = all; default d1,d2 on a named mix, else all)"
    )
    ap.add_argument("--target-tag", default="d2", help="the slice whose sampled pass rate stops training")
    ap.add_argument("--target", type=float, default=0.22, help="stop at this sampled pass@1 on --target-tag")
    ap.add_argument("--model-size", default="tiny", choices=sorted(MODEL_SIZES))
    ap.add_argument("--max-positions", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--hint-share", type=float, default=0.0, help="share of examples given a SAGE-form hint")
    ap.add_argument("--fresh", action="store_true", help="ignore a saved state of an interrupted build in --out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tasks = parse_tasks(args.tasks)
    spec = WarmStartSpec(
        tasks=tasks,
        train_tags=train_tags(args.train_tags, args.tasks, tasks),
        target_tag=args.target_tag,
        target=args.target,
        model_size=args.model_size,
        max_positions=args.max_positions,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        seed=args.seed,
        hint_share=args.hint_share,
    )
    try:  # a bad tag, target or context length: one clear line, not a traceback
        spec.validate()
        report = warm_start(spec, args.out, resume=not args.fresh)
    except ConfigError as e:
        raise SystemExit(f"warm_start: {e}") from None
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
