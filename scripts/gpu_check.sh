#!/usr/bin/env bash
# The GPU check for an offline GPU machine whose image has torch (CUDA), transformers, lightning and
# peft but not jsonargparse, MLflow, reasoning-gym or math-verify (and no vLLM: the CUDA wheel is too
# big to bring). NOT RUN YET: no GPU machine was at hand when it was written (docs/operations.md,
# "GPU and vLLM"). Run it from the repository root:
#
#   # on a machine with network, once: the missing packages as wheels, without dependencies
#   # (the image's torch, transformers and lightning are kept); add any dependency the image
#   # lacks (the exact list against the image is not worked out: this script has not run)
#   pip download --no-deps --dest wheels jsonargparse==4.53.0 docstring-parser typeshed-client \
#       mlflow-skinny==3.17.2 reasoning-gym==0.1.25 math-verify==0.9.0 latex2sympy2_extended
#   # on the GPU machine, with the tree and wheels/ copied over:
#   bash scripts/gpu_check.sh [wheels-folder]
#
# It installs the wheels into a private folder (no index, no dependency resolution against the
# image's pins), puts the project on PYTHONPATH (bypassing pyproject's pins), then runs:
#   1. the `gpu` tests (tests/integration/test_gpu.py; the vLLM one skips without vLLM);
#   2. 20 GRPO steps with the HF engine on CUDA in bf16 on a ~41M random Llama the tree builds
#      (scripts/bench_generate.py::build_llama_40m), single device and FSDP2 on one GPU,
#      printing step time, tokens/s, peak memory and the log-prob gap per run.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-wheels}"
WORK="$(mktemp -d -t curate-rl-gpu-check-XXXX)"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --target "$WORK/site" "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
python -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'lightning', lightning.__version__)"

python -m pytest -q -p no:cacheprovider -m gpu tests/integration/test_gpu.py

cd "$WORK"
python - "$OLDPWD" <<'PY'
import json
import sqlite3
import sys
import time

import torch

root = sys.argv[1]
sys.path.insert(0, root + "/scripts")
from bench_generate import build_llama_40m  # noqa: E402

from components.cli import build_cli  # noqa: E402

model = build_llama_40m("llama40m")
base = ["fit", "--config", f"{root}/recipes/grpo.yaml", "--model.model", str(model), "--trainer.accelerator", "gpu",
        "--trainer.devices", "1", "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "20",
        "--trainer.val_check_interval", "20", "--model.sampling.max_new_tokens", "64", "--model.num_threads", "null",
        "--model.export_dir", "null", "--model.log_completions_every_n_steps", "0"]
runs = {"single": [], "fsdp1gpu": ["--config", f"{root}/configs/fsdp.yaml", "--trainer.accelerator", "gpu",
                                   "--trainer.devices", "1", "--trainer.strategy.init_args.data_parallel_size", "1"]}
for name, extra in runs.items():
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cli = build_cli([*base, *extra, "--trainer.default_root_dir", name])
    wall = time.perf_counter() - t0
    con = sqlite3.connect("mlflow.db")
    run_id = con.execute("select run_uuid from runs order by start_time desc limit 1").fetchone()[0]
    m = {}
    for key, value in con.execute("select key, value from metrics where run_uuid = ? order by step", (run_id,)):
        m.setdefault(key, []).append(value)
    steps = m.get("time/train_s", [])
    tokens = sum(m.get("budget/tokens", []))
    print(json.dumps({
        "run": name, "steps": cli.trainer.global_step, "wall_s": round(wall, 1),
        "step_s_median": sorted(steps)[len(steps) // 2] if steps else None,
        "tokens_per_s": round(tokens / sum(steps), 1) if steps else None,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "logprob_gap_max": max(m.get("rollout/logprob_gap_max", [float("nan")])),
    }), flush=True)
PY
