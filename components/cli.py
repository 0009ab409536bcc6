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

import dataclasses
import errno
import sys
import tempfile
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from components.callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint
from components.callbacks.lifecycle import RunGuard
from components.data.datamodule import PromptDataModule, resolve_tasks
from components.errors import ConfigError, RunAborted, StopRequested
from components.preflight import check_trainer, load_checkpoint, preflight, print_summary
from components.quiet import silence_known_messages
from components.step.module import PolicyModule
from components.step.progress import StepBar
from components.store import owner_tags, prepare_store, store_lock

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.MLFlowLogger",
        "init_args": {"experiment_name": "curate-rl", "tracking_uri": "sqlite:///mlflow.db"},
    },
    "max_steps": 1000,  # about 6 min on 2 cores (docs/results.md, "The default run")
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


class _Parser(LightningArgumentParser):
    """Dumps (``--print_config``, the run's ``config.yaml``) show an unset ``data.tasks`` as the tasks
    the run trains on (see :func:`~components.data.datamodule.resolve_tasks` for why it stays unset)."""

    def dump(self, cfg: Any, *args: Any, **kwargs: Any) -> str:
        if "skip_none" in kwargs:  # LightningCLI 2.6 still passes jsonargparse's deprecated name for it
            kwargs["skip_unset"] = kwargs.pop("skip_none")
        if isinstance(cfg, Namespace) and "data.tasks" in cfg and cfg["data.tasks"] is None:
            cfg = cfg.clone()
            cfg["data.tasks"] = [dataclasses.asdict(t) for t in resolve_tasks(None, cfg.get("data.files"))]
        return super().dump(cfg, *args, **kwargs)


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
            callbacks = [*callbacks, StepBar()]
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
            args.tracking_uri = uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
        check_trainer(cfg.get("trainer", {}))
        # The store is checked, created and migrated here, under its lock, before MLFlowLogger's
        # constructor opens it: a bad store is one line, and runs started at once never race.
        if self.subcommand == "fit" and args is not None:
            prepare_store(uri, getattr(args, "experiment_name", None) or "lightning_logs")
            self._continue_run(args, uri)

    def _continue_run(self, args: Any, uri: Any) -> None:
        """A resume logs into the MLflow run its checkpoint came from when that run is in this
        store; otherwise the new run is tagged with it (``curate_rl.parent_run``)."""
        self._continued = None
        resume = getattr(self, "_resume_of", None)
        if not resume or not resume.get("run_id") or getattr(args, "run_id", None) is not None:
            return
        if resume.get("tracking_uri") == uri:
            from mlflow.tracking import MlflowClient

            try:
                run = MlflowClient(uri).get_run(resume["run_id"])
            except Exception:  # deleted from the store since: start a new run
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                args.run_id = self._continued = resume["run_id"]
                return
        args.tags = {**(getattr(args, "tags", None) or {}), "curate_rl.parent_run": resume["run_id"]}

    def before_fit(self) -> None:
        cfg = self.config.get(self.subcommand, self.config)
        preflight(self.trainer, self.model, self.datamodule, cfg.get("ckpt_path"))
        logger = self.trainer.logger
        # hasattr on the class: on the instance it would create the run, outside the lock
        if logger is None or not hasattr(type(logger), "run_id") or not self.trainer.is_global_zero:
            return
        if getattr(logger, "_run_id", None) is None:  # a new run records its owner (see components/store.py)
            logger.tags = {**(logger.tags or {}), **owner_tags()}
        with store_lock(getattr(logger, "_tracking_uri", None)):  # two fresh runs must not race on the experiment
            _ = logger.experiment, logger.run_id
        global _RUN_CREATED
        _RUN_CREATED = True
        resume = getattr(self, "_resume_of", None)
        if getattr(self, "_continued", None) == logger.run_id:  # the run goes on in this process
            client = logger.experiment
            for k, v in owner_tags().items():
                client.set_tag(logger.run_id, k, v)
            client.set_tag(logger.run_id, "curate_rl.resumed_from", f"{resume['path']} (step {resume['step']})")
            client.update_run(logger.run_id, status="RUNNING")
            print(
                f"curate-rl: resuming MLflow run {logger.run_id} at step {resume['step']} from {resume['path']}", file=sys.stderr
            )
            return  # its config and params were logged when it started
        if resume:  # Lightning's own restore lines are silenced (components/quiet.py): say it here
            why = (
                f"its MLflow run {resume['run_id']} is not in this store, so "
                if resume.get("run_id")
                else "its run is unknown, so "
            )
            tag = " (tag curate_rl.parent_run)" if resume.get("run_id") else ""
            print(
                f"curate-rl: resuming {resume['path']} at step {resume['step']}; {why}logging to a new run {logger.run_id}{tag}",
                file=sys.stderr,
            )
        text = (
            self.parser.dump(cfg, skip_unset=False) if self.subcommand is None else self._subparser().dump(cfg, skip_unset=False)
        )
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

    def after_fit(self) -> None:
        if self.trainer.is_global_zero and self.trainer.state.finished:
            print_summary(self.trainer, self.model)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here with a bare torch.load: a text file
        # or a truncated .ckpt would be a torch traceback. Check it first (one line, exit 2).
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        self._resume_of: dict | None = None
        if ckpt_path and ckpt_path not in ("last", "hpc", "registry", "best"):
            saved = load_checkpoint(str(ckpt_path))
            self._resume_of = {**(saved.get("curate_rl_run") or {}), "step": saved.get("global_step"), "path": str(ckpt_path)}
        super()._parse_ckpt_path()

    def _subparser(self):  # the parser of the running subcommand
        return self.parser._subcommands_action._name_parser_map[self.subcommand]


_RUN_CREATED = False  # an MLflow run exists: a later error must not remove the store


def build_cli(args: list[str] | None = None, run: bool = True) -> CurateCLI:
    """The CLI object (``run=False`` only parses and instantiates: used by tests and scripts)."""
    return CurateCLI(
        PolicyModule,
        PromptDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        parser_class=_Parser,
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
    import inspect
    import re

    msg = " ".join(msg.split())
    typo = re.search(r"given class_path '([\w.]+)': Option '(\w+)' is not accepted", msg)
    if typo:  # an init-arg typo: the class's own arguments, not the classes of its slot
        path, option = typo.groups()
        try:
            cls = getattr(importlib.import_module(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1])
            params = [
                n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and p.kind <= p.KEYWORD_ONLY
            ]
        except (ImportError, AttributeError, ValueError, TypeError):
            params = None
        if params is not None:
            return f" (valid arguments of {path.rsplit('.', 1)[1]}: {', '.join(params) or 'none'})"
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


def _bad_yaml(argv: list[str]) -> str:
    """The first ``--config`` file that is not valid YAML (for an error message)."""
    import yaml

    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for f in files:
        try:
            yaml.safe_load(Path(f).read_text())
        except (OSError, yaml.YAMLError):
            return str(f)
    return "a config"


def _has_runs(db: Path) -> bool:
    """Whether an sqlite store holds a run (False for an empty, foreign or unreadable file)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return con.execute("select count(*) from runs").fetchone()[0] > 0
        finally:
            con.close()
    except sqlite3.Error:
        return False


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
    silence_known_messages()  # known third-party messages, each by its text (components/quiet.py)
    hf_logging.disable_progress_bar()
    fresh = [p for p in (Path("mlflow.db"), Path("mlruns")) if not p.exists()]
    try:
        build_cli(args)
    except (ArgumentError, ConfigError) as e:
        if not _RUN_CREATED:
            for p in fresh:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists() and not _has_runs(p):  # another run started beside this one may own it
                    p.unlink()
        msg = " ".join(str(e).split()) + _valid_components(str(e))
        if "<unicode string>" in msg:  # a YAML syntax error: name the file it is in
            msg = msg.replace('"<unicode string>"', _bad_yaml(args if args is not None else sys.argv[1:]))
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
