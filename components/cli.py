"""The ``curate-rl`` command: a LightningCLI over :class:`PolicyModule` and :class:`PromptDataModule`.

    curate-rl fit --config recipes/grpo.yaml                        # the embedded tiny default
    curate-rl fit --config configs/cpu-tiny.yaml --config recipes/dapo.yaml
    curate-rl fit --config recipes/grpo.yaml --print_config

Defaults (overridable in any config): an MLflow sqlite store ``mlflow.db`` in the working
directory, a Rich progress bar, checkpoints every 50 steps in ``checkpoints/``, held-out evaluation
every 25 steps. A bad config exits with one line naming the field.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from components.data import PromptDataModule
from components.errors import ConfigError
from components.module import PolicyModule

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
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.dirpath": "checkpoints",
                "checkpoint.every_n_train_steps": 50,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
            }
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        # The Rich progress bar (reward, held-out pass rate, gate-open fraction) unless the user
        # disabled the bar or chose another one.
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, RichProgressBar()]
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
        logger = self.trainer.logger
        if logger is None or not hasattr(logger, "run_id") or not self.trainer.is_global_zero:
            return
        cfg = self.config.get(self.subcommand, self.config)
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
    from components.engine import RolloutEngine
    from components.rewards import Reward
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
    """Entry point of ``curate-rl``; exits with a one-line message on a bad configuration, leaving
    nothing behind (an MLflow store created by the failed start is removed again)."""
    import logging
    import shutil

    import mlflow  # noqa: F401  (configures its loggers on import; quieten them after)
    from transformers.utils import logging as hf_logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    fresh = [p for p in (Path("mlflow.db"), Path("mlruns")) if not p.exists()]
    try:
        build_cli(args)
    except (ArgumentError, ConfigError) as e:
        for p in fresh:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
        msg = " ".join(str(e).split()) + _valid_components(str(e))
        print(f"curate-rl: config error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
