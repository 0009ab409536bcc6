"""Where ``rollout/logprob_gap_max`` comes from: each engine's error against float64, and fp32's floor.

Runs a fit (any recipes and overlays) and, at every step before the update, scores the step's
batch three ways: the engine's sampling log-probs, the trainer's own fp32 forward (exactly as the
loss sees it) and a float64 forward of the same policy. It prints per step the gap the fit logs and
each side's error against float64 (the trainer's forward with ``model.shared_prompt``'s default), and for the worst tokens their first-order fp32 floor
``u * sum |d logp / d s * s|`` over every attention score ``s`` (``u = 2**-24``, fp32's unit
round-off): how far the log-prob moves when the scores alone are rounded to fp32, which every fp32
attention kernel does. A token whose two errors are of the order of its floor is ill-conditioned,
not mis-computed: no fp32 engine or trainer gets it closer. Llama-architecture policies (the
embedded model, SmolLM2); the float64 copy and the per-token backward make it slow on large ones.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python scripts/gap_floor.py \\
        --config recipes/grpo.yaml --config configs/cpu-vllm.yaml --trainer.max_steps 6

Every argument after the script's name goes to ``curate-rl fit``; ``--model.export_dir null`` is
added. Measured results: docs/operations.md, "GPU and vLLM".
"""

from __future__ import annotations

import copy
import sys

import torch

U32 = 2.0**-24


def _score_floor(model64: torch.nn.Module, ids: torch.Tensor, pos: int, target: int) -> list[float]:
    """``sum |d logp / d s * s|`` over each layer's attention scores, for the log-prob at ``pos``
    of ``target`` (float64, one unpadded row)."""
    from transformers import AttentionInterface

    scores: dict[int, torch.Tensor] = {}

    def attention(module, q, k, v, mask, **kwargs):  # plain causal attention that keeps its scores
        t = q.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        s = (q @ k.transpose(-1, -2)) * module.scaling
        s.retain_grad()
        scores[module.layer_idx] = s
        return (torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v).transpose(1, 2), None

    AttentionInterface.register("gap_floor", attention)
    previous = model64.config._attn_implementation
    model64.config._attn_implementation = "gap_floor"
    try:
        logp = torch.log_softmax(model64(input_ids=ids).logits[0, pos], -1)[target]
        logp.backward()
    finally:
        model64.config._attn_implementation = previous
        model64.zero_grad(set_to_none=True)
    out = []
    for layer in sorted(scores):
        s = scores[layer]
        causal = torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool).tril()
        out.append(float(((s.grad * s.detach()).abs() * causal).sum()))
    return out


def report(batch, policy: torch.nn.Module, temperature: float, shared_prompt: bool, step: int, worst: int = 4) -> None:
    """Print one step's errors (see the module docstring)."""
    from components.algos.batch import forward_logprobs

    rows, mask = torch.arange(batch.size), batch.response_mask.bool()
    with torch.no_grad():
        trainer = forward_logprobs(policy, batch, rows, temperature, shared_prompt)[0].double()
        model64 = copy.deepcopy(policy).double()
        exact = forward_logprobs(model64, batch, rows, temperature, False)[0]
    engine = batch.sampling_logprobs.double()
    gap, e_err, t_err = ((a - b).abs() * mask for a, b in ((engine, trainer), (engine, exact), (trainer, exact)))
    n = int(mask.sum())
    print(
        f"step {step}: {n} tokens | gap max {gap.max():.2e} | engine-fp64 max {e_err.max():.2e} "
        f"({int((e_err > 1e-5).sum())} tokens > 1e-5) | trainer-fp64 max {t_err.max():.2e} "
        f"({int((t_err > 1e-5).sum())} tokens > 1e-5)",
        flush=True,
    )
    print("   row col  p      engine-fp64 trainer-fp64 gap       floor u*sum  sum|dlogp/ds*s| per layer")
    for i in gap.flatten().topk(min(worst, n)).indices.tolist():
        row, col = divmod(i, mask.shape[1])
        att = batch.attention_mask[row]
        ids = batch.input_ids[row][att.bool()][None]
        pos = int(att[: batch.context_width].sum()) - 1 + col  # logits at pos predict token pos + 1
        per_layer = _score_floor(model64, ids, pos, int(ids[0, pos + 1]))
        print(
            f"  {row:4d} {col:3d}  {float(exact[row, col].exp()):.3f}  {e_err[row, col]:.2e}    {t_err[row, col]:.2e}"
            f"     {gap[row, col]:.2e}  {U32 * sum(per_layer):.2e}     {[round(s) for s in per_layer]}",
            flush=True,
        )


def main(argv: list[str]) -> None:
    from components.cli import build_cli
    from components.step import update

    run = update.Updater.run
    steps = [0]

    def measured_run(self, batch, handle, optim, callbacks=()):
        steps[0] += 1
        temperature = handle.sampling.temperature or 1.0
        report(batch, handle.policy, temperature, True, steps[0])  # the module's default: shared prompt
        return run(self, batch, handle, optim, callbacks)

    update.Updater.run = measured_run
    build_cli(["fit", *argv, "--model.export_dir", "null"])


if __name__ == "__main__":
    main(sys.argv[1:])
