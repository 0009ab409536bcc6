"""Choose the shared base (lr, update schedule, length) on the TUNING held-out split.

Every method of a comparison runs on one shared base (the module's defaults: optimizer, PPO
mini-batches per generation batch, ...). This script picks that base by running the default recipe
(GRPO on the embedded default) once per grid point, evaluated on ``data.heldout_split: tune`` (a
held-out set from a third seed, kept apart from the training pool and from the ``test`` set that
judges the methods), and prints each point's gain: best tuning pass@1 at or before a step budget
minus its step-0 value, with the step at which it was reached. It never reads the test split, and
the chosen base applies to every method alike (never per method).

    python scripts/tune_base.py --out .cache/tune --jobs 2                  # the grid below
    python scripts/tune_base.py --out .cache/tune --report-only             # print the table again

Runs are resumable by folder: a grid point whose store already holds a finished run is read, not
re-run. Runs under load take longer but give the same numbers per step (one thread, seeded), so the
step budget (``--budgets``) is what is compared; ``docs/results.md`` converts it to wall time on an
idle machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASS = "eval/pass_at_1"


def _optimizer(lr: float) -> str:
    return f"{{class_path: torch.optim.AdamW, init_args: {{lr: {lr}, betas: [0.9, 0.98], weight_decay: 0.0}}}}"


def _point_name(lr: float, minibatches: int, seed: int) -> str:
    return f"lr{lr:g}_mb{minibatches}_s{seed}"


def _finished(db: Path) -> bool:
    if not db.exists():
        return False
    con = sqlite3.connect(db)
    try:
        return bool(con.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0])
    except sqlite3.DatabaseError:
        return False
    finally:
        con.close()


def _run(folder: Path, lr: float, minibatches: int, seed: int, max_steps: int, extra: list[str]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    if _finished(folder / "mlflow.db"):
        return 0
    cmd = [
        sys.executable,
        "-m",
        "components.cli",
        "fit",
        "--config",
        str(ROOT / "recipes" / "grpo.yaml"),
        "--data.heldout_split",
        "tune",
        "--seed_everything",
        str(seed),
        "--model.optimizer",
        _optimizer(lr),
        "--model.num_minibatches",
        str(minibatches),
        "--trainer.max_steps",
        str(max_steps),
        "--model.export_dir",
        "null",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    with open(folder / "log.txt", "w") as log:
        return subprocess.call(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def _curve(db: Path) -> list[tuple[int, float]]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("select step, value from metrics where key = ? order by step", (PASS,)).fetchall()
    finally:
        con.close()
    return [(int(s), float(v)) for s, v in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(".cache/tune"))
    ap.add_argument("--lrs", default="1e-4,2e-4,3e-4")
    ap.add_argument("--minibatches", default="4,2", help="optimizer updates per generation batch (>= 2)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--budgets", default="750,1000", help="step budgets the gain is read at")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("extra", nargs="*", help="more fit flags for every run, after --")
    a = ap.parse_args()
    lrs = [float(x) for x in a.lrs.split(",")]
    mbs = [int(x) for x in a.minibatches.split(",")]
    if min(mbs) < 2:
        ap.error("--minibatches: the shared base keeps >= 2 updates per generation batch")
    seeds = [int(x) for x in a.seeds.split(",")]
    budgets = [int(x) for x in a.budgets.split(",")]
    grid = list(itertools.product(lrs, mbs, seeds))
    if not a.report_only:
        with ThreadPoolExecutor(a.jobs) as pool:
            codes = list(
                pool.map(
                    lambda g: _run(a.out / _point_name(*g), *g, a.max_steps, a.extra),
                    grid,
                )
            )
        for g, rc in zip(grid, codes):
            if rc:
                print(f"{_point_name(*g)}: exit {rc}, see {a.out / _point_name(*g) / 'log.txt'}", file=sys.stderr)
    head = "point".ljust(22) + "step0 " + " ".join(f"best@{b:<5} (step) gain@{b:<5}" for b in budgets) + " final"
    print(head)
    for g in grid:
        db = a.out / _point_name(*g) / "mlflow.db"
        if not _finished(db):
            print(f"{_point_name(*g):22s}(not finished)")
            continue
        curve = _curve(db)
        start = curve[0][1]
        cols = []
        for b in budgets:
            upto = [(v, -s) for s, v in curve if s <= b]
            best, neg_at = max(upto)  # the first step that reached the best value
            at = -neg_at
            cols.append(f"{best:.3f}      ({at:4d}) {best - start:+.3f}     ")
        print(f"{_point_name(*g):22s}{start:.3f} " + " ".join(cols) + f" {curve[-1][1]:.3f}")


if __name__ == "__main__":
    main()
