"""Peak memory of one generate call as a function of batch and length: before and after.

"output_scores" is how the HF engine computed sampling log-probs before (``generate(...,
output_scores=True)``, every step's full-vocabulary scores kept until the end: O(steps x rows x
vocab)); "engine" is today's :class:`components.engines.hf.HFEngine` (the chosen token's log-prob
recorded step by step: O(rows x vocab)). Each measurement runs in a fresh subprocess on CPU with a
randomly initialised small Llama whose vocabulary is large (the shape of the problem on real models:
Qwen2.5's vocabulary is 151,936). The peak is the process's resident-set high-water mark during the
call (reset just before it through /proc/self/clear_refs), minus the resident set before it.

    python scripts/bench_generate_memory.py                       # the default grid, a table
    python scripts/bench_generate_memory.py --batch 8 --steps 256 --vocab 32000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(vocab: int, width: int):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=width,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tokenizer


def _generate(mode: str, model, tokenizer, batch: int, steps: int) -> None:
    import torch

    from components.engines.base import SamplingParams
    from components.engines.hf import HFEngine

    contexts = [[1, 5 + i % 7, 9, 11] for i in range(batch)]
    if mode == "engine":
        eng = HFEngine()
        eng.bind(model, tokenizer)
        eng.generate(contexts, [1] * batch, SamplingParams(1.0, 1.0, steps))
        return
    # Before: keep every step's scores, then read the chosen tokens' log-probs from them.
    from transformers import GenerationConfig

    ids = torch.tensor(contexts)
    cfg = GenerationConfig(
        do_sample=True,
        top_k=0,
        max_new_tokens=steps,
        pad_token_id=0,
        eos_token_id=2,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        new = res.sequences[:, ids.shape[1] :]
        torch.stack([torch.log_softmax(s, -1).gather(1, new[:, t : t + 1]).squeeze(1) for t, s in enumerate(res.scores)], 1)


def measure(mode: str, batch: int, steps: int, vocab: int) -> dict:
    """Runs in the child process."""
    import torch

    torch.set_num_threads(1)
    model, tokenizer = _build(vocab, steps + 8)
    _generate(mode, model, tokenizer, 1, 2)  # warm-up: libraries, allocator
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    t0 = time.perf_counter()
    _generate(mode, model, tokenizer, batch, steps)
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    return {
        "mode": mode,
        "batch": batch,
        "steps": steps,
        "vocab": vocab,
        "peak_mib": round((peak - before) / 1024, 1),
        "scores_mib": round(batch * steps * vocab * 4 / 2**20, 1),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--modes", nargs="+", default=["output_scores", "engine"], choices=["output_scores", "engine"])
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "BATCH", "STEPS", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, b, s, v = args.child
        print(json.dumps(measure(mode, int(b), int(s), int(v))))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for b in args.batch:
        for s in args.steps:
            for mode in args.modes:
                run = subprocess.run(
                    [sys.executable, __file__, "--child", mode, str(b), str(s), str(args.vocab)],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                if run.returncode != 0:
                    raise SystemExit(run.stderr[-2000:])
                row = json.loads(run.stdout.strip().splitlines()[-1])
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    if not args.json:
        print(f"{'mode':<14}{'batch':>6}{'steps':>7}{'vocab':>8}{'peak MiB':>10}{'all scores MiB':>16}{'s':>7}")
        for r in rows:
            print(
                f"{r['mode']:<14}{r['batch']:>6}{r['steps']:>7}{r['vocab']:>8}{r['peak_mib']:>10}{r['scores_mib']:>16}{r['seconds']:>7}"
            )


if __name__ == "__main__":
    main()
