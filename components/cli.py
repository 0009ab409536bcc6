"""The ``curate-rl`` command: a LightningCLI over :class:`PolicyModule` and :class:`PromptDataModule`.

    curate-rl fit --config recipes/grpo.yaml                        # the embedded tiny default
    curate-rl fit --config configs/cpu-tiny.yaml --config recipes/dapo.yaml
    curate-rl fit --config recipes/grpo.yaml --print_config

Defaults (overridable in any config): an MLflow sqlite store ``mlflow.db`` in the working
directory, a Rich progress bar, checkpoints every 50 steps in ``checkpoints/<run name>-<run id>/``
(the last 3 kept, plus ``last.ckpt``; written atomically), held-out evaluation every 25 steps, and
a :class:`~components.callbacks.lifecycle.RunGuard` (``guard:``) for clean stops and fault limits.

Exit codes: 0 done; 1 a failure (the MLflow run is FAILED; a deliberate abort prints one line);
2 a bad input (one line ``curate-rl: ...`` naming the field or file, nothing written); 143 / 130
stopped by SIGTERM / SIGINT (checkpoint written, the MLflow run is KILLED).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from components.callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint
from components.callbacks.lifecycle import RunGuard, identity_difference, run_identity
from components.data.datamodule import PromptDataModule
from components.errors import ConfigError, RunAborted, StopRequested
from components.step.module import PolicyModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.MLFlowLogger",
        "init_args": {"experiment_name": "curate-rl", "tracking_uri": "sqlite:///mlflow.db"},
    },
    "max_steps": 750,
    "val_check_interval": 25,
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "enable_model_summary": False,
}


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(d, list) and any(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}/{i}"))
    else:
        out[prefix] = str(d)[:6000]  # MLflow's param value limit
    return out


class CurateCLI(LightningCLI):
    """LightningCLI that logs the resolved config to MLflow itself.

    Lightning's ``SaveConfigCallback`` cannot write next to an MLflow sqlite store, so it is told
    not to, and the config goes to the run as params (flattened ``a/b/c`` keys) and as
    ``config.yaml``.
    """

    def add_arguments_to_parser(self, parser) -> None:
        # Checkpointing as its own config group (``checkpoint:``), so recipes can tune it without
        # restating the whole ``trainer.callbacks`` list.
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.dirpath": "checkpoints",
                "checkpoint.every_n_train_steps": 50,
                "checkpoint.save_last": True,
            }
        )
        parser.add_lightning_class_args(RunGuard, "guard")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        # The Rich progress bar (reward, held-out pass rate, gate-open fraction) unless the user
        # disabled the bar or chose another one.
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, RichProgressBar()]
        if not config.get("plugins"):  # checkpoints written to a temporary file and renamed
            config = {**config, "plugins": [AtomicCheckpointIO()]}
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        # MLflow caches stores by URI: a relative ``sqlite:///mlflow.db`` would keep pointing at the
        # first working directory's file in a long-lived process. Pin it to the current directory.
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        logger = cfg.get("trainer", {}).get("logger")
        args = getattr(logger, "init_args", None)
        uri = getattr(args, "tracking_uri", None) if args is not None else None
        if isinstance(uri, str) and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            args.tracking_uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())

    def before_fit(self) -> None:
        cfg = self.config.get(self.subcommand, self.config)
        preflight(self.trainer, self.model, self.datamodule, cfg.get("ckpt_path"))
        logger = self.trainer.logger
        if logger is None or not hasattr(logger, "run_id") or not self.trainer.is_global_zero:
            return
        with _store_lock(getattr(logger, "_tracking_uri", None)):  # two fresh runs must not race on the schema
            _ = logger.experiment, logger.run_id
        global _RUN_CREATED
        _RUN_CREATED = True
        text = self.parser.dump(cfg, skip_none=False) if self.subcommand is None else self._subparser().dump(cfg, skip_none=False)
        client, run_id = logger.experiment, logger.run_id
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(text)
            client.log_artifact(run_id, str(path))
        import yaml

        flat = {k: v for k, v in _flatten(yaml.safe_load(text)).items() if not k.startswith("config")}
        from mlflow.entities import Param

        items = [Param(k[:250], v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
        recipes = [Path(str(c)).stem for c in (cfg.get("config") or [])]
        if recipes:
            client.set_tag(run_id, "recipe", "+".join(recipes))
            if not getattr(logger, "_run_name", None):  # keep a run name the user gave
                client.set_tag(run_id, "mlflow.runName", "+".join(recipes))

    def _subparser(self):  # the parser of the running subcommand
        return self.parser._subcommands_action._name_parser_map[self.subcommand]


_RUN_CREATED = False  # an MLflow run exists: a later error must not remove the store


@contextlib.contextmanager
def _store_lock(uri: str | None) -> Iterator[None]:
    """An exclusive lock per sqlite store while its schema, experiment and run are created.

    The lock file lives in the temporary folder (keyed by the store's path), so nothing is left in
    the working directory."""
    if not (isinstance(uri, str) and uri.startswith("sqlite:///")):
        yield
        return
    import fcntl

    key = hashlib.sha1(uri.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"curate-rl-mlflow-{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _writable(path: str | Path, field: str) -> None:
    """The nearest existing folder of ``path`` accepts a new file (probed, then removed)."""
    p = Path(path).expanduser().resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise ConfigError(field, f"{path} cannot be created: {p} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise ConfigError(field, f"{path} is not writable ({p}: {e.strerror}); choose a writable folder") from None


def _check_checkpoint(ckpt_path: str, model: PolicyModule, trainer: Any) -> None:
    if ckpt_path in ("last", "hpc", "registry", "best"):
        return
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
        raise ConfigError("ckpt_path", f"{ckpt_path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ("state_dict" not in ckpt and p.name != "meta.pt"):
        raise ConfigError("ckpt_path", f"{ckpt_path} is not a Lightning checkpoint (no state_dict)")
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
        _writable(ckpt._base_dirpath, "checkpoint.dirpath")
    if model.export_dir:
        _writable(model.export_dir, "model.export_dir")
    uri = getattr(trainer.logger, "_tracking_uri", None)
    if isinstance(uri, str) and uri.startswith("sqlite:///"):
        _writable(Path(uri[len("sqlite:///") :]).parent, "trainer.logger.init_args.tracking_uri")
    _writable(trainer.default_root_dir, "trainer.default_root_dir")
    # Read every data file now (malformed records fail here), without the prefilter, which needs
    # the trainer. The pool is then dropped again so that the real set-up under the trainer builds
    # it as before: the prefilter's pass, and each data-parallel rank's own stream seed.
    prefilter = getattr(dm, "prefilter", None)
    dm.prefilter = None
    try:
        dm.setup("fit")
        _check_budget(model, dm)
        _check_prompt_lengths(model, dm)
    finally:
        dm.prefilter = prefilter
        dm.train_pool, dm.heldout = None, []


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


def build_cli(args: list[str] | None = None, run: bool = True) -> CurateCLI:
    """The CLI object (``run=False`` only parses and instantiates: used by tests and scripts)."""
    return CurateCLI(
        PolicyModule,
        PromptDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=None,
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False},
        seed_everything_default=0,
        args=args,
        run=run,
    )


def _valid_components(msg: str) -> str:
    """For an unknown component, list the classes that would be valid in that slot."""
    import importlib
    import pkgutil

    import components.samplers
    from components.engines.base import RolloutEngine
    from components.rewards.verifier import Reward
    from components.samplers.base import Sampler

    for mod in pkgutil.iter_modules(components.samplers.__path__):
        importlib.import_module(f"components.samplers.{mod.name}")
    for key, base in (("model.sampler", Sampler), ("model.engine", RolloutEngine), ("model.reward", Reward)):
        if f'"{key}"' in msg:
            found, todo = [], list(base.__subclasses__())
            while todo:
                cls = todo.pop()
                todo += cls.__subclasses__()
                if not getattr(cls, "__abstractmethods__", None) and not cls.__name__.startswith("LazyInstance_"):
                    found.append(f"{cls.__module__}.{cls.__qualname__}")
            return f" (valid for {key}: {', '.join(sorted(found))})"
    return ""


def main(args: list[str] | None = None) -> None:
    """Entry point of ``curate-rl``.

    A bad input exits 2 with one line, leaving nothing behind (an MLflow store created by the
    failed start is removed again, unless a run was already created in it). A stop signal exits
    143 / 130 after marking the MLflow run KILLED (the checkpoint was written by RunGuard). A
    deliberate abort or a full disk exits 1 with one line; other errors keep their traceback.
    """
    import logging
    import shutil

    import mlflow  # noqa: F401  (configures its loggers on import; quieten them after)
    from transformers.utils import logging as hf_logging

    global _RUN_CREATED
    _RUN_CREATED = False
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    fresh = [p for p in (Path("mlflow.db"), Path("mlruns")) if not p.exists()]
    try:
        build_cli(args)
    except (ArgumentError, ConfigError) as e:
        if not _RUN_CREATED:
            for p in fresh:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists():
                    p.unlink()
        msg = " ".join(str(e).split()) + _valid_components(str(e))
        print(f"curate-rl: config error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None
    except StopRequested as e:
        if e.run_id and e.tracking_uri:
            from mlflow.tracking import MlflowClient

            MlflowClient(e.tracking_uri).set_terminated(e.run_id, "KILLED")
        where = f"; resume with --ckpt_path {e.checkpoint}" if e.checkpoint else ""
        print(f"curate-rl: stopped by signal {e.signum}{where}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except RunAborted as e:
        print(f"curate-rl: run aborted: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"curate-rl: disk full writing {e.filename or 'output'}; the previous checkpoint is intact", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
