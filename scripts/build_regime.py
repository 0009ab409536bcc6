"""Build (or reuse) a regime's model and print how to run a recipe under it.

    python scripts/build_regime.py sparse          # warm-starts on first use, then cached
    python scripts/build_regime.py --list
    python scripts/build_regime.py reasoning --force --measure

Models are cached in ``.cache/curate-rl/regimes/<name>`` (git-ignored) with a ``regime.json`` that
records the build (steps, seconds, stopping pass rates) and the spec's hash; the regime's overlay
``configs/regimes/<name>.yaml`` names that folder as ``model.model``. ``--measure`` reports the
model's initial pass rate per slice on the RL run's own held-out set (data.seed 0, 300 items, 4
samples at T=1: what the run's step-0 evaluation measures) and the mean completion length.
From Python (e.g. the ablation runner): ``components.analysis.regimes.build_regime(name)``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from components.analysis.regimes import REGIMES, build_regime, cached_report, get_regime


def measure(name: str) -> dict:
    """Initial per-slice pass rates and completion lengths of regime ``name``'s model, as an RL run sees them."""
    from components.analysis.warm_start import measure_pass_rates
    from components.data.datamodule import PromptDataModule, default_tasks
    from components.policy import load_policy

    reg = get_regime(name)
    model, tok = load_policy(build_regime(name))
    tasks = reg.warm_start.tasks if reg.warm_start is not None else default_tasks()
    dm = PromptDataModule(tasks=tasks, train_size=2000, heldout_size=300, seed=0)
    dm.setup()
    # The generation length the regime's runs use (its overlay's model.sampling.max_new_tokens).
    overlay = yaml.safe_load(reg.config.read_text())
    max_new = overlay.get("model", {}).get("sampling", {}).get("max_new_tokens", 8)
    lengths: dict[str, list[int]] = {}
    t0 = time.time()
    rates = measure_pass_rates(model, tok, dm, max_new, samples=4, answer_lengths=lengths)
    all_len = [x for v in lengths.values() for x in v]
    return {
        "pass_rate": {k: round(v, 3) for k, v in rates.items()},
        "mean_completion_tokens": {k: round(sum(v) / len(v), 1) for k, v in sorted(lengths.items())}
        | {"all": round(sum(all_len) / len(all_len), 1)},
        "max_new_tokens": max_new,
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help=f"one of {sorted(REGIMES)}")
    ap.add_argument("--list", action="store_true", help="list the regimes and whether their models are built")
    ap.add_argument("--force", action="store_true", help="rebuild even when a cached model matches the spec")
    ap.add_argument("--measure", action="store_true", help="report initial pass rates per slice on the RL held-out set")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.list or not args.name:
        for r in REGIMES.values():
            state = "shipped model" if r.warm_start is None else ("built" if cached_report(r.name) else "not built")
            print(f"{r.name:10s} {state:13s} {r.description}")
        return
    path = build_regime(args.name, force=args.force)
    print(f"model: {path}")
    if r := cached_report(args.name):
        print(f"built in {r['seconds']}s, {r['steps']} steps, stopping eval {r['stop_eval']}")
    print(
        f"run:   curate-rl fit --config recipes/grpo.yaml --config {get_regime(args.name).config.relative_to(get_regime(args.name).config.parents[2])}"
    )
    if args.measure:
        print(json.dumps(measure(args.name), indent=2))


if __name__ == "__main__":
    main()
