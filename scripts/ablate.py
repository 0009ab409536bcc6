"""Compare recipes at equal cost: recipes x seeds (x overlay sets), each run under the same drawn budget,
tracked in MLflow, summarised as a table (markdown + CSV) and a plot of pass@1 against generated tokens.

    python scripts/ablate.py --preset embedded --jobs 2                 # the embedded benchmark (~40 min idle, 2 cores)
    python scripts/ablate.py --preset smoke                             # 2 recipes x 2 seeds, tiny budget
    python scripts/ablate.py --recipes recipes/grpo.yaml recipes/dapo.yaml --seeds 0 1 2 \\
        --max-tokens 50000 --overlays configs/cpu-tiny.yaml -- --trainer.val_check_interval 5
    python scripts/ablate.py --report-only --ablation-id embedded-1a2b3c4d    # table of a finished ablation
    python scripts/ablate.py --report-only --experiment curate-rl           # all runs of an experiment

Each run is ``curate-rl fit --config <overlay>... --config <recipe> <extra args after -->`` (an
authors variant, recipes/authors/x.yaml, is composed after its recipe: ``--config recipes/x.yaml
--config recipes/authors/x.yaml``; a regime's files come after the recipe) plus a
``BudgetCap`` callback, a step limit that never binds, ``--seed_everything <seed>`` and the MLflow
logger pointed at ``--tracking-uri`` / ``--experiment``; the run is tagged ``ablation_id``,
``recipe``, ``seed`` (through ``MLFLOW_RUN_CONTEXT``, see ``components.analysis.plan.fit_command``).
Runs execute in this working directory (a config's relative paths, such as a regime's cached model,
mean what they mean to ``curate-rl fit`` run from here) and write to
``<out>/<ablation id>/runs/<label>/seed<k>/`` (checkpoints, outputs, ``fit.log``), so they never share
an output folder; the report goes to ``<out>/<ablation id>/report/`` and to a summary MLflow run
(tags ``ablation_id``, ``kind=summary``).

Seeds vary only the training randomness (``seed_everything``: rollout sampling, eval sampling,
shuffles). ``data.seed`` is left alone, so every seed and every recipe sees the same training pool,
the same held-out set and the same prompt stream: the differences in the table are the method's
and the sampling noise's, not the data's.

Resume: the ablation id defaults to a hash of the settings (budget, step limit, extra args), not of
the recipes or seeds, so re-running the same command skips every run already FINISHED in MLflow
(same ablation id, recipe, overlays, seed and recipe file contents) and redoes runs left RUNNING
(killed) or FAILED; a recipe added to recipes/ later joins the same ablation. Do not run two
ablate.py processes on one ablation at once. Each run also records a fingerprint of what it read
besides its config files (``ablation_inputs_sha``: the config and weight files of the model it
loaded, and every file or folder named after ``--``): rebuilding a model at the same path, or
editing a data file, and re-running refuses with one line naming the changed inputs instead of
resuming onto runs made from the old ones (use another ``--ablation-id``). Each run is tagged with
the regime it ran in (``ablation_regime``: its ``--regime`` files, else the regime file whose mix
and model equal the run's, else ``custom (...)``), which the report and the claims table print.

Embedded benchmark sizing (``--preset embedded``): measured 2026-11-23 on the project's 2-core
machine, otherwise idle, two single-thread runs side by side (``--jobs 2``), on the embedded default
(32 prompts x G=8 per step, 300 held-out items x 4 samples):
  - GRPO draws 256 rollouts = ~1,055 generated tokens per step; an 80k-token run (76 steps,
    11 evals) took 45 s end to end, of which ~8 s is process start and teardown;
  - per 1k budget tokens: ~0.45 s for GRPO, Dr. GRPO and DynaMO, ~0.35 s for DAPO, Ada-Seq and PODS
    (they skip zero-advantage rows in the update), ~0.9 s for GVM (its gradient-norm passes);
    ~0.5 s on average;
  - under load (another job's two processes on the same cores) everything is 3-4x slower.
  Budget 320,000 tokens (~300 GRPO steps, ~78k rollouts; eval every 12 steps, ~26 evals):
  one run ~ 10 s + 320 x 0.5 s ~ 170 s. The 9 recipes of 2026-11-23 x 3 seeds = 27 runs / 2 jobs
  x 170 s ~ 40 min on an idle machine. In general:
  wall ~ recipes x seeds x (10 s + 0.5 s x budget/1000) / jobs. Past ~12 recipes, pass --seeds 0 1
  or a smaller --max-tokens (the ablation id changes with the budget, so that is a new ablation).
  At 80k tokens (the preset's first size) every recipe ended within 2 points of GRPO: too early
  in the curve to separate methods, hence the larger budget.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from components.analysis.claims import comparisons_needed, premise_metrics
from components.analysis.comparison import summarize
from components.analysis.cost_axes import PASS_AT_1, Budget
from components.analysis.mlflow_io import ablation_runs, load_results, resolve_tracking_uri
from components.analysis.plan import RunSpec, default_ablation_id, fit_command, plan, regime_files, settings_of
from components.analysis.recipe_header import controls_by_name, with_controls
from components.analysis.report import log_summary, write_report

ROOT = Path(__file__).resolve().parents[1]

PRESETS: dict[str, dict] = {
    "embedded": {
        "recipes": "recipes/*.yaml",
        "seeds": [0, 1, 2],
        "budget": Budget("tokens", 320_000),
        "baseline": "recipes/grpo.yaml",
        "slice": "d2",  # the learnable slice of the embedded mix (1 digit: solved, 3 digits: never)
        "extra": ["--trainer.val_check_interval", "12"],
    },
    "smoke": {
        "recipes": ["recipes/grpo.yaml", "recipes/dr_grpo.yaml"],
        "seeds": [0, 1],
        "budget": Budget("tokens", 1_500),
        "baseline": "recipes/grpo.yaml",
        "slice": "d2",
        "extra": [
            "--data.train_size",
            "200",
            "--data.heldout_size",
            "32",
            "--data.batch_size",
            "8",
            "--trainer.val_check_interval",
            "2",
        ],
    },
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after -- go to every `curate-rl fit` unchanged.",
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a predefined ablation (its settings are defaults)")
    ap.add_argument("--recipes", nargs="+", help="recipe files or globs (preset embedded: recipes/*.yaml)")
    ap.add_argument("--seeds", nargs="+", type=int, help="seed_everything values (default 0 1 2)")
    ap.add_argument(
        "--overlays",
        action="append",
        metavar="A.yaml[,B.yaml]",
        help="an overlay set composed before each recipe; repeat for several variants ('' = none)",
    )
    ap.add_argument(
        "--regime",
        nargs="+",
        metavar="NAME[+NAME]",
        help="regime presets (configs/regimes/NAME.yaml, composed after each recipe; '+' combines); one variant each",
    )
    ap.add_argument("--no-controls", action="store_true", help="do not add each recipe's matched control (its header)")
    cap = ap.add_mutually_exclusive_group()
    cap.add_argument("--max-tokens", type=int, help="budget: cumulative generated tokens per run")
    cap.add_argument("--max-rollouts", type=int, help="budget: cumulative drawn rollouts per run")
    cap.add_argument("--max-steps", type=int, help="budget: training steps (generation batches) per run")
    cap.add_argument("--max-train-s", type=int, help="budget: training wall seconds per run (evaluation excluded)")
    ap.add_argument("--step-limit", type=int, default=1_000_000, help="trainer.max_steps under a non-step budget (must not bind)")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each (2 on a 2-core machine)")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="curate-rl-ablations")
    ap.add_argument("--ablation-id", help="default: <preset or 'ablation'>-<hash of the settings>")
    ap.add_argument("--out", default="ablations", help="working dirs of the runs and report files")
    ap.add_argument("--baseline", help="recipe the others are compared to (default: the first recipe)")
    ap.add_argument("--target", type=float, help="pass@1 target (default: the baseline's final mean pass@1)")
    ap.add_argument("--slice", help="also report eval/pass_at_1/<slice>, e.g. d2")
    ap.add_argument("--band", choices=["minmax", "std"], default="minmax", help="band over seeds in the plot")
    ap.add_argument("--report-only", action="store_true", help="no runs: the table of what MLflow already has")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands, run nothing")
    ap.add_argument("--no-summary-run", action="store_true", help="do not log the report to a summary MLflow run")
    args = ap.parse_args(argv)
    preset = PRESETS.get(args.preset, {})
    args.extra = list(preset.get("extra", [])) + extra
    args.seeds = args.seeds or preset.get("seeds", [0, 1, 2])
    args.slice = args.slice or preset.get("slice")
    caps = {"tokens": args.max_tokens, "rollouts": args.max_rollouts, "steps": args.max_steps, "train_s": args.max_train_s}
    given = [(k, v) for k, v in caps.items() if v]
    args.budget = Budget(*given[0]) if given else preset.get("budget")
    recipes = args.recipes or preset.get("recipes") or []
    args.recipe_paths = expand_recipes([recipes] if isinstance(recipes, str) else recipes)
    if not (args.no_controls or preset.get("no_controls")):
        args.recipe_paths = with_controls(args.recipe_paths, ROOT)
    regimes = args.regime or preset.get("regimes") or []
    try:
        args.regime_sets = [regime_files(r, ROOT) for r in regimes] or [()]
    except ValueError as e:
        ap.error(str(e))
    args.baseline = args.baseline or preset.get("baseline") or (args.recipe_paths[0] if args.recipe_paths else None)
    args.overlay_sets = [tuple(norm(p) for p in s.split(",") if p) for s in (args.overlays or [""])]
    if not args.report_only and (not args.recipe_paths or args.budget is None):
        ap.error("give --recipes and a budget (--max-tokens/--max-rollouts/--max-steps/--max-train-s), or a --preset")
    return args


def norm(path: str) -> str:
    """A file path as stored in MLflow: relative to the repository when inside it."""
    p = Path(path).resolve()
    if not p.is_file():
        raise SystemExit(f"ablate: {path} is not a file")
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def expand_recipes(patterns: list[str]) -> list[str]:
    """Files and globs (relative globs are tried from here, then from the repository root)."""
    out: list[str] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            hits = sorted(Path().glob(pat)) or sorted(ROOT.glob(pat))
            out += [norm(str(h)) for h in hits]
        else:
            out.append(norm(pat) if Path(pat).exists() or Path(pat).is_absolute() else norm(str(ROOT / pat)))
    return list(dict.fromkeys(out))


def run_one(cmd: list[str], env_updates: dict[str, str], run_dir: Path) -> tuple[int, float]:
    if run_dir.exists():  # a previous attempt's checkpoints and log: start clean
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = dict(os.environ, **env_updates)
    t0 = time.time()
    with open(run_dir / "fit.log", "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.time() - t0


def run_ablation(args: argparse.Namespace, client, exp_id: str, settings: str) -> int:
    # Seed-major: an ablation stopped part-way has whole seeds of every recipe, comparable row by row.
    specs = [
        RunSpec.of(r, ov, s, rg, ROOT)
        for ov in args.overlay_sets
        for rg in args.regime_sets
        for s in args.seeds
        for r in args.recipe_paths
    ]
    existing = ablation_runs(client, [exp_id], args.ablation_id)
    try:
        planned = plan(specs, existing, args.ablation_id, settings, ROOT, args.extra)
    except ValueError as e:
        raise SystemExit(f"ablate: {e}") from None
    for note in planned.notes:
        print(f"  note: {note}")
    print(
        f"ablation {args.ablation_id}: {len(specs)} runs ({len(planned.done)} already finished, {len(planned.todo)} to run), "
        f"budget {args.budget}, {args.jobs} at a time"
    )
    run_dirs = {spec: Path(args.out) / args.ablation_id / "runs" / spec.label / f"seed{spec.seed}" for spec in planned.todo}
    cmds = {
        spec: fit_command(
            spec,
            args.budget,
            ablation_id=args.ablation_id,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            settings=settings,
            extra_args=args.extra,
            max_steps=args.step_limit,
            root=ROOT,
            run_dir=run_dirs[spec],
        )
        for spec in planned.todo
    }
    if args.dry_run:
        for cmd, env in cmds.values():
            print(f"MLFLOW_RUN_CONTEXT='{env['MLFLOW_RUN_CONTEXT']}'", shlex.join(cmd))
        return 0
    for rid in planned.stale_run_ids:  # left RUNNING by a killed ablation: it is redone below
        client.set_terminated(rid, "KILLED")
    failed, durations, t_start = [], [], time.time()
    pool = cf.ThreadPoolExecutor(max_workers=max(args.jobs, 1))
    futures = {pool.submit(run_one, *cmds[s], run_dirs[s]): s for s in planned.todo}
    try:
        for i, fut in enumerate(cf.as_completed(futures), 1):
            spec = futures[fut]
            rc, dt = fut.result()
            durations.append(dt)
            eta = sum(durations) / len(durations) * (len(planned.todo) - i) / max(args.jobs, 1)
            status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {run_dirs[spec] / 'fit.log'})"
            print(
                f"  [{i}/{len(planned.todo)}] {spec.label} seed {spec.seed}: {status} in {dt:.0f} s; "
                f"elapsed {time.time() - t_start:.0f} s, ~{eta:.0f} s left",
                flush=True,
            )
            if rc != 0:
                failed.append(spec)
    except KeyboardInterrupt:  # the running fits got the signal too; start no more
        pool.shutdown(wait=False, cancel_futures=True)
        raise SystemExit("ablate: interrupted; run the same command again to resume") from None
    pool.shutdown()
    return 1 if failed else 0


def report(args: argparse.Namespace, client, exp_id: str) -> None:
    runs = ablation_runs(client, [exp_id], args.ablation_id)
    metrics = [PASS_AT_1] + ([f"{PASS_AT_1}/{args.slice}"] if args.slice else [])
    results = load_results(client, runs, metrics, premise_metrics())
    if not results:
        print(f"ablate: no finished runs for ablation {args.ablation_id!r} in experiment {args.experiment!r}")
        return
    budgets = {r.budget for r in results if r.budget}
    if len(budgets) > 1:
        raise SystemExit(f"ablate: runs with different budgets {sorted(budgets)}: report one ablation id at a time")
    if budgets:
        budget = Budget.parse(budgets.pop())
    elif args.budget is not None:
        budget = args.budget
    else:  # runs not made by ablate.py: compare over the range every run covered
        budget = Budget("tokens", int(min(r.final_tokens for r in results)))
        print(f"note: runs carry no budget tag; comparing over the common range, {budget}")
    if args.baseline is None:  # report-only without recipes: grpo when present, else the first
        names = sorted({r.recipe for r in results})
        args.baseline = "grpo" if "grpo" in names else names[0]
    controls = controls_by_name([str(p) for p in sorted((ROOT / "recipes").glob("*.yaml"))], ROOT)
    rows = summarize(
        results,
        budget,
        baseline=args.baseline,
        target=args.target,
        slice_metric=metrics[1] if args.slice else None,
        controls=controls,
        comparisons=comparisons_needed(controls),
    )
    name = args.ablation_id or args.experiment
    title = f"Ablation {name}" if args.ablation_id else f"Experiment {name}"
    out = Path(args.out) / name / "report"
    md, files = write_report(client, results, rows, budget, out, name=name, title=title, band=args.band)
    print(md)
    print(f"report files: {out}/" + ", ".join(f.name for f in files))
    if not args.no_summary_run:
        rid = log_summary(
            client,
            exp_id,
            args.ablation_id,
            files,
            {"budget": str(budget), "baseline": args.baseline, "target": args.target, "slice": args.slice, "runs": len(results)},
        )
        print(f"summary MLflow run: {rid} (experiment {args.experiment})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mlflow import MlflowClient

    args.tracking_uri = resolve_tracking_uri(args.tracking_uri, Path.cwd())
    client = MlflowClient(args.tracking_uri)
    settings = settings_of(args.budget, args.extra, args.step_limit) if args.budget else None
    if args.ablation_id is None and settings is not None and (not args.report_only or args.preset or args.recipes):
        args.ablation_id = default_ablation_id(args.preset or "ablation", settings)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        if args.report_only:
            raise SystemExit(f"ablate: no experiment {args.experiment!r} at {args.tracking_uri}")
        # Created here, before any run starts, so parallel runs never race to create it and its
        # artifacts land beside the ablation (not in each run's working directory).
        art = (Path(args.out).resolve() / "mlartifacts").as_uri()
        exp_id = client.create_experiment(args.experiment, artifact_location=art)
    else:
        exp_id = exp.experiment_id
    rc = 0 if args.report_only else run_ablation(args, client, exp_id, settings)
    if not args.dry_run:
        report(args, client, exp_id)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
