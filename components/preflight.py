"""Set-up checks run before anything is written, and the summary a finished run prints.

:func:`preflight` runs in ``CurateCLI.before_fit``: a bad input fails there with one line naming
the field or file (exit 2, no MLflow run, no checkpoint folder), not at step 17.
:func:`check_trainer` and :func:`load_checkpoint` run earlier, before Lightning builds the
trainer or reads the checkpoint, which would otherwise fail with a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Timer

from components.callbacks.checkpoint import RunCheckpoint
from components.callbacks.lifecycle import RunGuard, identity_difference, run_identity
from components.data.datamodule import PromptDataModule
from components.errors import ConfigError
from components.step.module import PolicyModule
from components.store import sqlite_path, view_url, writable


def print_summary(trainer: Any, model: PolicyModule) -> None:
    """The run's last lines: final held-out pass@1 by slice, the MLflow run, checkpoints, policy."""
    res = model.last_eval
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    left = timer.time_remaining() if timer is not None else None
    why = ""  # Lightning's own "Time limit reached" line is silenced (components/quiet.py)
    if left is not None and left <= 0 and trainer.global_step < (trainer.max_steps or 0):
        why = f" of {trainer.max_steps}: trainer.max_time reached after {int(timer.time_elapsed())} s"
    lines = [f"curate-rl: finished at step {trainer.global_step}{why}"]
    if res:
        slices = sorted(k.rsplit("/", 1)[1] for k in res if k.startswith("eval/pass_at_1/"))
        by = ", ".join(f"{s} {res[f'eval/pass_at_1/{s}']:.3f}" for s in slices)
        lines.append(f"  held-out pass@1 {res.get('eval/pass_at_1', float('nan')):.3f}" + (f" ({by})" if by else ""))
    logger = trainer.logger
    if logger is not None and hasattr(type(logger), "run_id"):
        uri = str(logger._tracking_uri)
        lines.append(f"  MLflow run     {logger.run_id} (experiment {logger._experiment_name})")
        lines.append(f"  open it        mlflow ui --backend-store-uri {uri}")
        if sqlite_path(uri) is not None:  # the store holds the view (components/store.py)
            lines.append(f"  eval first     {view_url(logger.experiment_id)}")
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.dirpath:
        lines.append(f"  checkpoints    {ckpt.dirpath}")
    if model.exported_to:
        lines.append(f"  final policy   {Path(model.exported_to).resolve()}")
    print("\n".join(lines), flush=True)


def check_trainer(trainer: Any) -> None:
    """Trainer settings Lightning would reject with a traceback, or accept and then do nothing."""
    steps = trainer.get("max_steps")
    if isinstance(steps, int) and steps < 1:
        # -1 is Lightning's "no step limit": the prompt stream is endless (one epoch never ends), so
        # such a run would stop only on a signal; a time budget is trainer.max_time beside a step count.
        what = {0: "nothing to train", -1: "Lightning's 'no limit', but the prompt stream never ends"}.get(
            steps, "a negative step count"
        )
        raise ConfigError(
            "trainer.max_steps",
            f"must be >= 1 training steps, got {steps} ({what}); to stop on time as well, add trainer.max_time (e.g. 00:02:00:00)",
        )
    acc = str(trainer.get("accelerator") or "")
    if acc in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "trainer.accelerator",
                f"{acc} is set (e.g. by configs/gpu-1x.yaml) but no CUDA GPU is visible here; "
                "run without the GPU overlay, or add --trainer.accelerator cpu",
            )


def load_checkpoint(ckpt_path: str) -> dict:
    """The checkpoint's contents (tensors memory-mapped), or one line saying why it is not one."""
    p = Path(ckpt_path)
    if p.is_dir():  # a sharded (FSDP2) checkpoint: its non-tensor state is in meta.pt
        p = p / "meta.pt"
        if not p.is_file():
            raise ConfigError("ckpt_path", f"{ckpt_path} is a folder but not a sharded checkpoint (no meta.pt)")
    elif not p.is_file():
        raise ConfigError("ckpt_path", f"{ckpt_path} does not exist (valid: a .ckpt file, e.g. checkpoints/<run>/last.ckpt)")
    import torch

    try:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip-format file: mmap is not possible
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises many types
        raise ConfigError(
            "ckpt_path",
            f"{ckpt_path} is not a readable checkpoint ({type(e).__name__}: a truncated file or not a .ckpt); "
            "pass a last.ckpt or epoch=*-step=*.ckpt from checkpoints/<run name>-<run id>/",
        ) from None
    if not isinstance(ckpt, dict) or ("state_dict" not in ckpt and p.name != "meta.pt"):
        raise ConfigError("ckpt_path", f"{ckpt_path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def _check_checkpoint(ckpt_path: str, model: PolicyModule, trainer: Any) -> None:
    if ckpt_path in ("last", "hpc", "registry", "best"):
        return
    ckpt = load_checkpoint(ckpt_path)
    step = ckpt.get("global_step")
    if isinstance(step, int) and trainer.max_steps is not None and 0 <= trainer.max_steps <= step:
        raise ConfigError(
            "trainer.max_steps",
            f"{trainer.max_steps}, but {ckpt_path} is at step {step}: nothing is left to train; "
            f"set --trainer.max_steps above {step} to continue it",
        )
    guard = next((c for c in trainer.callbacks if isinstance(c, RunGuard)), None)
    diff = identity_difference(ckpt.get("curate_rl_identity"), run_identity(model))
    if diff and not (guard is not None and guard.force_resume):
        raise ConfigError("ckpt_path", f"{diff}; resume it with the same set-up, or set --guard.force_resume true")


def preflight(trainer: Any, model: PolicyModule, dm: PromptDataModule, ckpt_path: str | None) -> None:
    """Set-up checks run before anything is written (no MLflow run, no checkpoint folder): a bad
    input fails here with one line naming the field or file, not at step 17."""
    if model.sampling.temperature == 0:
        raise ConfigError(
            "model.sampling.temperature",
            "must be > 0 for training rollouts (greedy rollouts of a prompt are identical, so no group has a "
            "learning signal); greedy decoding stays available for model.eval.temperature and hint writing",
        )
    try:
        groups = model.configure_optimizers().param_groups
    except ValueError as e:  # torch's own checks, e.g. "Invalid learning rate: -0.0001"
        raise ConfigError("model.optimizer.init_args", f"{e} (the learning rate must be > 0)") from None
    for group in groups:
        lr = group.get("lr")
        if isinstance(lr, (int, float)) and not lr > 0:
            raise ConfigError("model.optimizer.init_args.lr", f"must be > 0, got {lr}")
    if ckpt_path is not None:
        _check_checkpoint(str(ckpt_path), model, trainer)
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, RunCheckpoint) and ckpt._base_dirpath:
        writable(ckpt._base_dirpath, "checkpoint.dirpath")
    if model.export_dir:
        writable(model.export_dir, "model.export_dir")
    uri = getattr(trainer.logger, "_tracking_uri", None)
    if isinstance(uri, str) and uri.startswith("sqlite:///"):
        writable(Path(uri[len("sqlite:///") :]).parent, "trainer.logger.init_args.tracking_uri")
    writable(trainer.default_root_dir, "trainer.default_root_dir")
    # Read every data file now (malformed records fail here), without the prefilter, which needs
    # the trainer. The pool is then dropped again so that the real set-up under the trainer builds
    # it as before: the prefilter's pass, and each data-parallel rank's own stream seed.
    prefilter = getattr(dm, "prefilter", None)
    dm.prefilter = None
    try:
        dm.setup("fit")
        _check_signal(model, dm)
        _check_budget(model, dm)
        _check_prompt_lengths(model, dm)
    finally:
        dm.prefilter = prefilter
        dm.train_pool, dm.heldout = None, []


GROUP_RELATIVE = ("grpo", "dr_grpo", "rloo")  # advantages measured against the prompt's own group


def _check_signal(model: PolicyModule, dm: PromptDataModule) -> None:
    """Set-ups that cannot learn, or cannot draw a batch: refused before the first step."""
    size = getattr(model.sampler, "group_size", None)
    if size == 1 and model.adv_cfg.name in GROUP_RELATIVE:
        raise ConfigError(
            "model.sampler.group_size",
            f"1 with model.advantage.name={model.adv_cfg.name}: a group-relative advantage of a lone rollout is "
            "always 0, so nothing would train; use group_size >= 2 (e.g. 8), or a baseline that is not the "
            "group's own (model.advantage.name: pool_mean)",
        )
    pool = len(dm.train_pool.prompts) if dm.train_pool is not None else 0
    if dm.batch_size > pool:
        raise ConfigError(
            "data.batch_size",
            f"{dm.batch_size} is larger than the training pool of {pool} prompts; lower it to <= {pool} or raise data.train_size",
        )


def _check_budget(model: PolicyModule, dm: PromptDataModule) -> None:
    """An allocation sampler's per-step budget against ``data.batch_size`` prompts."""
    from components.samplers.allocation import AllocationSampler, largest_remainder

    s = model.sampler
    if not isinstance(s, AllocationSampler):
        return
    b = dm.batch_size
    budget = s.total_budget(b)
    if s.pilot * b > budget:
        raise ConfigError(
            "model.sampler.pilot", f"a pilot of {s.pilot} x {b} prompts (data.batch_size) exceeds the step budget {budget}"
        )
    floors = [max(0, s.n_min - s.pilot)] * b
    caps = [None if s.n_max is None else max(0, s.n_max - s.pilot)] * b
    largest_remainder([1.0] * b, budget - s.pilot * b, floors, caps, field=s._budget_field + f" (with data.batch_size={b})")


def _check_prompt_lengths(model: PolicyModule, dm: PromptDataModule) -> None:
    """Every training and held-out prompt plus ``max_new_tokens`` fits the model's context."""
    engine = model.engine
    limit = (
        getattr(engine, "max_context_tokens", None)
        or getattr(engine, "max_model_len", None)
        or getattr(model.policy.config, "max_position_embeddings", None)
    )
    if not limit:
        return
    new = model.sampling.max_new_tokens
    prompts = dm.all_prompts()
    too_long = [(len(model.handle.context_of(p)), p) for p in prompts]
    too_long = [(n, p) for n, p in too_long if n + new > limit]
    if too_long:
        n, p = max(too_long, key=lambda t: t[0])
        raise ConfigError(
            "data",
            f"{len(too_long)} of {len(prompts)} prompts do not fit the model's context of {limit} tokens with "
            f"model.sampling.max_new_tokens={new}; the longest ({n} tokens, task {p.task}, uid {p.uid}) "
            f"starts {p.text[:40]!r}; shorten or filter the prompts, or lower max_new_tokens",
        )
