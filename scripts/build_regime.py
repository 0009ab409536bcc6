"""Build (or reuse) a regime's model and print how to run a recipe under it.

    python scripts/build_regime.py sparse          # warm-starts on first use, then cached
    python scripts/build_regime.py --list
    python scripts/build_regime.py reasoning --force --measure
    python scripts/build_regime.py hinted --measure-hints

A regime is one file, ``configs/regimes/<name>.yaml`` (its mix in ``data.tasks``, its model in
``model.model``, its warm start in a ``# warm start:`` header line: components/analysis/regimes.py);
adding a file adds a regime. A model is built into the folder its overlay names (conventionally
``.cache/curate-rl/regimes/<name>``, git-ignored) with a ``regime.json`` that records the build
(steps, seconds, stopping pass rates) and the spec's hash, and ``warm_start.json`` (how it was
built); an interrupted build resumes. ``--measure`` reports the model's initial pass rate per slice
on the RL run's own held-out set (data.seed 0, 300 items, 4 samples at T=1: what the run's step-0
evaluation measures) and the mean completion length; ``--measure-hints`` the same per SAGE hint
level (0 = none, then 1..3, the hints recipes/sage.yaml writes): SAGE's premise needs it to rise
with the level. From Python (e.g. the ablation runner): ``components.analysis.regimes.build_regime(name)``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from components.analysis.regimes import build_regime, cached_report, get_regime, load_regimes


def _setup(name: str):
    """The regime's model, tokenizer, the RL run's held-out set on its mix, and its generation length."""
    from components.data.datamodule import PromptDataModule, default_tasks
    from components.policy import load_policy

    reg = get_regime(name)
    model, tok = load_policy(build_regime(name))
    dm = PromptDataModule(tasks=reg.tasks or default_tasks(), train_size=2000, heldout_size=300, seed=0)
    dm.setup()
    # The generation length the regime's runs use (its overlay's model.sampling.max_new_tokens).
    overlay = yaml.safe_load(reg.config.read_text())
    max_new = (overlay.get("model") or {}).get("sampling", {}).get("max_new_tokens", 8)
    return model, tok, dm, max_new


def measure(name: str) -> dict:
    """Initial per-slice pass rates and completion lengths of regime ``name``'s model, as an RL run sees them."""
    from components.analysis.warm_start import measure_pass_rates

    model, tok, dm, max_new = _setup(name)
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


def measure_hints(name: str, levels: int = 3) -> dict:
    """Initial pass rate per SAGE hint level (and slice) of regime ``name``'s model on the RL held-out set."""
    from components.analysis.warm_start import measure_hinted_pass_rates

    model, tok, dm, max_new = _setup(name)
    t0 = time.time()
    rates = measure_hinted_pass_rates(model, tok, dm, max_new, samples=4, levels=levels)
    overall = [rates[f"level_{lv}"]["all"] for lv in range(levels + 1)]
    return {
        "pass_rate_by_level": {k: {t: round(v, 3) for t, v in r.items()} for k, r in rates.items()},
        "rises_with_level": all(b > a for a, b in zip(overall, overall[1:])),
        "max_new_tokens": max_new,
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="a regime: a file stem of configs/regimes/ (--list shows them)")
    ap.add_argument("--list", action="store_true", help="list the regimes and whether their models are built")
    ap.add_argument("--force", action="store_true", help="rebuild even when a built model matches the spec")
    ap.add_argument("--measure", action="store_true", help="report initial pass rates per slice on the RL held-out set")
    ap.add_argument("--measure-hints", action="store_true", help="report initial pass rates per SAGE hint level")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.list or not args.name:
        for r in load_regimes().values():
            if r.modifier:
                state = "modifier"
            elif r.warm_start is None or r.shipped:
                state = "shipped model"
            else:
                state = "built" if cached_report(r.name) else "not built"
            print(f"{r.name:18s} {state:13s} {r.description}")
        return
    reg = get_regime(args.name)
    path = build_regime(args.name, force=args.force)
    print(f"model: {path}")
    if r := cached_report(args.name):
        print(f"built in {r['seconds']}s, {r['steps']} steps, stopping eval {r['stop_eval']}")
    print(f"run:   curate-rl fit --config recipes/grpo.yaml --config {reg.config.relative_to(reg.config.parents[2])}")
    if args.measure:
        print(json.dumps(measure(args.name), indent=2))
    if args.measure_hints:
        print(json.dumps(measure_hints(args.name), indent=2))


if __name__ == "__main__":
    main()
