"""Step time of curate-rl's GRPO step against TRL's GRPOTrainer, same model, batch and schedule.

Both sides train the embedded tiny Llama (``--model llama40m``: a random ~41M Llama over the same
char tokenizer, built as scripts/bench_generate.py builds it; identical prompt token ids: TRL gets
``"<bos>" + text``) on the same prompts (``--prompts`` 16 per step x ``--group`` G = 8 rollouts,
``--new-tokens`` new tokens, the task's verifier or ``--reward coin`` on both sides,
temperature 1, no KL, GRPO advantage and seq-mean-token-mean loss, one torch thread, zero-advantage
rows not skipped) with the same update schedule: one generation batch feeds ``--minibatches``
optimizer updates (TRL: ``steps_per_generation``). A "step" is one generation batch on both sides
(TRL: ``steps_per_generation`` optimizer steps). Runs alternate between the sides in blocks
(``--rounds`` x ``--steps`` steps each, the first ``--warmup`` steps and the last of a block untimed) so
that load from other processes hits both alike; the script prints per-phase medians and the ratio.
TRL runs in fp32 without gradient checkpointing (its GRPOConfig defaults to bf16 and checkpointing),
like our side.

    pip install -e ".[bench]"      # TRL 1.16.0 (an optional benchmark dependency)
    python scripts/bench_vs_trl.py --new-tokens 8
    python scripts/bench_vs_trl.py --new-tokens 32 --minibatches 4
    python scripts/bench_vs_trl.py --model llama40m --reward coin --prompts 4 --group 4 --steps 3

It also prints a physical limit: one plain forward + backward per optimizer update over rows shaped
like the measured step (no framework, no old-log-prob pass), plus our measured generation time.

Phases: generate (the engine's generate on our side, HF ``generate`` on TRL's), scoring (the same verifier on both sides), forward (every
policy forward outside generation: old log-probs and the loss), backward, optimizer (step +
zero_grad + gradient clipping), other (the rest: batching, advantages, metrics, the framework's loop).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["generate", "scoring", "forward", "backward", "optimizer"]


def coin(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """``--reward coin``: 0 or 1 from a hash of the completion, the same on both sides. A model with
    random weights (``--model llama40m``) never passes the verifier, so every group would be
    degenerate and our side would skip its update; this keeps both sides training."""
    return [float(zlib.crc32(c.encode()) & 1) for c in completions]


class Phases:
    """Accumulates wall time per phase between ``mark`` calls (one per step)."""

    def __init__(self) -> None:
        self.cur: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.t_start: float | None = None
        self.lengths: list[int] = []

    def wrap(self, obj: object, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.cur[phase] += time.perf_counter() - t0

        setattr(obj, name, timed)

    def mark(self, record: bool) -> None:
        """A step boundary: close the running step (kept if ``record``), open the next."""
        now = time.perf_counter()
        if self.t_start is not None and record:
            step = dict(self.cur)
            step["total"] = now - self.t_start
            self.steps.append(step)
        self.cur = defaultdict(float)
        self.t_start = now


def run_ours(args: argparse.Namespace, phases: Phases, n_steps: int, seed: int) -> None:
    from components.cli import build_cli

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            phases.mark(record=trainer.global_step > args.warmup)

        def on_train_end(self, trainer, pl_module) -> None:
            # The last step is not recorded: its span would include the end of the fit (the final
            # checkpoint, seconds for a 40M model and its optimizer state).
            phases.mark(record=False)
            phases.t_start = None

        def on_train_start(self, trainer, pl_module) -> None:
            opt = trainer.optimizers[0]
            for name in ("step", "zero_grad"):
                phases.wrap(opt, name, "optimizer")
            phases.wrap(pl_module, "clip_gradients", "optimizer")

    cli = build_cli(
        [
            "--config", str(ROOT / "recipes" / "grpo.yaml"),
            "--seed_everything", str(seed),
            "--trainer.max_steps", str(n_steps),
            "--trainer.logger", "false",
            "--trainer.val_check_interval", "100000",
            "--trainer.enable_progress_bar", "false",
            "--checkpoint.every_n_train_steps", "100000",
            "--model.model", args.model_path,
            "--data.batch_size", str(args.prompts),
            "--model.sampler.init_args.group_size", str(args.group),
            "--model.sampling.max_new_tokens", str(args.new_tokens),
            "--model.sampling.temperature", "1.0",
            "--model.num_minibatches", str(args.minibatches),
            "--model.ppo_epochs", "1",
            "--model.micro_batch_rows", "512",
            "--model.skip_zero_advantage", "false",
            "--model.shared_prompt", str(args.shared_prompt).lower(),
            "--model.minibatch_split", args.minibatch_split,
            "--model.old_logprobs", args.old_logprobs,
            *(["--model.reward", "bench_vs_trl:coin"] if args.reward == "coin" else []),
            "--model.loss.kl_coef", "0.0",
            "--model.eval.at_start", "false",
            "--model.export_dir", "null",
            "--model.log_completions_every_n_steps", "0",
        ],
        run=False,
    )  # fmt: skip
    m = cli.model
    gen = m.engine.generate

    def counting(*a, **k):  # the generated lengths, for the physical-limit measurement
        outs = gen(*a, **k)
        phases.lengths += [len(r.token_ids) for rs in outs for r in rs]
        return outs

    m.engine.generate = counting
    phases.wrap(m.engine, "generate", "generate")
    phases.wrap(m.reward, "score", "scoring")
    phases.wrap(m, "forward_logprobs", "forward")
    phases.wrap(m, "manual_backward", "backward")
    cli.trainer.callbacks.append(Clock())
    cli.trainer.fit(m, datamodule=cli.datamodule)


def run_trl(args: argparse.Namespace, phases: Phases, n_steps: int, seed: int, tmp: str) -> None:
    import pyarrow as pa
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from components.data.datamodule import PromptDataModule
    from components.policy import load_policy
    from components.rewards.verifier import VerifierReward
    from components.types import Rollout

    dm = PromptDataModule(batch_size=args.prompts)
    dm.setup("fit")
    from types import SimpleNamespace

    from components.engines.base import SamplingParams

    reward = VerifierReward()
    # The reward reads only the sampling settings from the handle (the overlong penalty's length).
    reward.setup(SimpleNamespace(sampling=SamplingParams(max_new_tokens=args.new_tokens)), dm.verifier)
    pool = {p.uid: p for p in dm.train_pool.prompts}
    # The same weighted stream of prompts our data module serves.
    rows = [{"prompt": "<bos>" + p.text, "uid": p.uid} for p in dm.draw(args.prompts * (n_steps + 1))]

    def verifier(prompts, completions, uid, **_):
        out = []
        for c, u in zip(completions, uid):
            r = Rollout(token_ids=[], logprobs=[], text=c, finished=True)
            reward.score(pool[u], [r])
            out.append(r.reward)
        return out

    model, tok = load_policy(args.model_path)
    s = args.minibatches
    cfg = GRPOConfig(
        output_dir=tmp,
        use_cpu=True,
        # TRL's GRPOConfig defaults to gradient checkpointing and bf16; ours runs neither (fp32, no
        # recomputation), so both are switched off for a like-for-like step.
        gradient_checkpointing=False,
        bf16=False,
        seed=seed,
        max_steps=n_steps * s,
        per_device_train_batch_size=args.prompts * args.group // s,
        gradient_accumulation_steps=1,
        steps_per_generation=s,
        num_generations=args.group,
        num_iterations=1,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=1e-4,
        adam_beta2=0.98,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    # An explicit fingerprint: datasets' own hashing of the table's schema fails with some pyarrow builds.
    ds = Dataset(pa.Table.from_pylist(rows), fingerprint=f"bench-{seed}")
    trainer = GRPOTrainer(
        model=model, reward_funcs=[coin if args.reward == "coin" else verifier], args=cfg, train_dataset=ds, processing_class=tok
    )

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, optimizer=None, **kw):
            phases.wrap(optimizer, "step", "optimizer")
            phases.wrap(optimizer, "zero_grad", "optimizer")

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step % s == 0:  # a generation batch starts
                phases.mark(record=state.global_step // s > args.warmup)

        def on_train_end(self, a, state, control, **kw):
            phases.mark(record=False)  # as on our side: the end of the fit is not a step
            phases.t_start = None

    phases.wrap(model, "generate", "generate")
    phases.wrap(trainer, "_get_per_token_logps_and_entropies", "forward")
    phases.wrap(trainer.accelerator, "backward", "backward")
    phases.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")
    phases.wrap(trainer, "_calculate_rewards", "scoring")
    trainer.add_callback(Clock())
    trainer.train()


def run_limit(args: argparse.Namespace, lengths: list[int], n_steps: int) -> list[float]:
    """The step's floor without any framework: one plain forward + backward per optimizer update
    over rows shaped like the measured step (the step's contexts, responses of the mean generated
    length), a log-prob loss, nothing else. Returns the time of each timed step."""
    from components.algos.batch import build_batch
    from components.data.datamodule import PromptDataModule
    from components.policy import encode_prompt, load_policy
    from components.types import Group, Rollout

    model, tok = load_policy(args.model_path)
    model.train()
    dm = PromptDataModule(batch_size=args.prompts)
    dm.setup("fit")
    n_resp = max(1, round(statistics.mean(lengths))) if lengths else args.new_tokens
    out = []
    for step in range(n_steps):
        groups = []
        for p in dm.draw(args.prompts):
            rs = [Rollout([5 + (i + j) % 60 for j in range(n_resp)], [0.0] * n_resp, "", True) for i in range(args.group)]
            groups.append(Group(p, encode_prompt(tok, p.text), rs))
        b = build_batch(groups, tok.pad_token_id)
        t0 = time.perf_counter()
        for rows in torch.arange(b.size).tensor_split(args.minibatches):
            logits = model(input_ids=b.input_ids[rows], attention_mask=b.attention_mask[rows]).logits
            lp = torch.log_softmax(logits[:, b.context_width - 1 : -1].float(), -1)
            lp = lp.gather(-1, b.input_ids[rows, b.context_width :, None]).squeeze(-1)
            (-(lp * b.response_mask[rows]).sum() / b.response_mask[rows].sum()).backward()
        if step >= args.warmup:
            out.append(time.perf_counter() - t0)
    return out


def _summary(steps: list[dict[str, float]]) -> dict[str, float]:
    out = {p: statistics.median(s.get(p, 0.0) for s in steps) for p in [*PHASES, "total"]}
    out["other"] = statistics.median(s["total"] - sum(s.get(p, 0.0) for p in PHASES) for s in steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--minibatches", type=int, default=4, help="optimizer updates per generation batch (both sides)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks per side")
    ap.add_argument("--steps", type=int, default=6, help="generation batches per block")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each block")
    ap.add_argument("--shared-prompt", type=lambda v: v.lower() in ("1", "true", "yes"), default=True)
    ap.add_argument(
        "--minibatch-split", default="group", choices=["group", "row"], help="our side's model.minibatch_split"
    )
    ap.add_argument(
        "--old-logprobs", default="recompute", choices=["recompute", "sampling"], help="our side's model.old_logprobs"
    )
    ap.add_argument("--reward", default="verifier", choices=["verifier", "coin"], help="both sides' reward (see coin)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step (both sides)")
    ap.add_argument("--group", type=int, default=8, help="rollouts per prompt (both sides)")
    ap.add_argument(
        "--model", default="tiny", help="tiny (the embedded model) or llama40m (random ~41M Llama, scripts/bench_generate.py)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    ours, trl = Phases(), Phases()
    limit: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        args.model_path = "embedded:tiny"
        sys.path.insert(0, str(ROOT / "scripts"))  # bench_vs_trl:coin, bench_generate
        if args.model == "llama40m":
            from bench_generate import build_llama_40m

            args.model_path = str(build_llama_40m(Path(tmp) / "llama40m"))
        os.chdir(tmp)
        for r in range(args.rounds):
            run_ours(args, ours, args.steps + args.warmup, seed=r)
            run_trl(args, trl, args.steps + args.warmup, seed=r, tmp=tmp)
            limit += run_limit(args, ours.lengths, args.steps + args.warmup)
    a, b = _summary(ours.steps), _summary(trl.steps)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.model}: {args.prompts} prompts x G={args.group}, {args.new_tokens} new tokens, {args.minibatches} updates per generation batch, "
        f"reward {args.reward}, shared_prompt={args.shared_prompt}, minibatch_split={args.minibatch_split}, old_logprobs={args.old_logprobs}, 1 thread; {len(ours.steps)} / {len(trl.steps)} timed steps "
        f"over {args.rounds} interleaved rounds; load average {load:.1f}"
    )
    print(f"{'phase (median ms)':<20}{'curate-rl':>11}{'share':>7}{'TRL':>11}{'share':>7}{'ratio':>8}")
    for p in [*PHASES, "other", "total"]:
        ratio = a[p] / b[p] if b[p] > 0 else float("nan")
        print(f"{p:<20}{a[p] * 1e3:>11.1f}{a[p] / a['total']:>7.0%}{b[p] * 1e3:>11.1f}{b[p] / b['total']:>7.0%}{ratio:>8.2f}")
    print(f"step time ratio curate-rl / TRL: {a['total'] / b['total']:.2f}")
    # The floor: one plain forward + backward per update, plus generation at our measured speed.
    floor = statistics.median(limit) + a["generate"]
    print(
        f"physical limit (one fwd+bwd per update {statistics.median(limit) * 1e3:.1f} ms + our generation "
        f"{a['generate'] * 1e3:.1f} ms; mean rollout {statistics.mean(ours.lengths):.1f} tokens): "
        f"{floor * 1e3:.1f} ms; curate-rl / limit {a['total'] / floor:.2f}, TRL / limit {b['total'] / floor:.2f}"
    )


if __name__ == "__main__":
    main()
