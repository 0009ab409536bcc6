"""The MLflow tracking store, opened inside the one-line error path and under a lock.

:func:`prepare_store` runs before Lightning's ``MLFlowLogger`` is built (whose constructor opens the
store, creating and migrating a fresh sqlite file). For a local sqlite store it

1. checks that the working directory (MLflow's default artifact root ``./mlruns``) and the store's
   folder accept a new file, and that an existing store file is an sqlite database that reads back
   whole; a failure is a :class:`~components.errors.ConfigError` naming the file and the fix;
2. takes an exclusive lock per store (a file in the temporary folder, keyed by the store's path) and,
   holding it, creates or migrates the schema and the experiment, so that runs started at once in
   one fresh folder never race on the schema (alembic's migrations are not safe to run twice at once);
3. marks FAILED every run of the store left RUNNING by a process of this host that is gone (a
   ``kill -9``, a machine that lost power): each run records its owner as the tags
   ``curate_rl.host``, ``curate_rl.pid`` and ``curate_rl.pid_start`` (:func:`owner_tags`).
   A run whose owner is alive, or that ran on another host, is left alone.

The experiment is tagged ``mlflow.experimentKind = custom_model_development`` so that MLflow 3's
UI opens it on its training runs (not on the GenAI traces overview), and carries a view of its runs
page with the held-out evaluation first (:func:`runs_view`, opened by :func:`view_url`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.errors import ConfigError

FIELD = "trainer.logger.init_args.tracking_uri"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
OWNER_TAGS = ("curate_rl.host", "curate_rl.pid", "curate_rl.pid_start")

# MLflow's runs page groups charts into sections by metric prefix (the key up to its last "/") and
# sorts the sections alphabetically, so budget/* (17 charts) comes before eval/*. MLflow 3.17's
# saved views are experiment tags ``mlflow.sharedViewState.<id>`` holding ``{name, createdAt,
# updatedAt, state}`` (state: the page's JSON, plain or deflated); they are listed in the runs page's
# views menu and opened by ``?viewStateShareKey=<id>``. In this one the sections follow
# SECTION_ORDER; sections not listed are appended after them. (Read from mlflow 3.17.2's
# server/js bundle: the saved-view envelope and useSharedExperimentViewState.)
VIEW_KEY = "curate-rl-eval-first"
VIEW_NAME = "curate-rl: evaluation first"
VIEW_CREATED_MS = 1767225600000  # fixed (2026-01-01), so the tag's value is the same at every start
SECTION_ORDER = (
    "eval", "eval/pass_at_1", "reward", "gate", "signal", "train", "loss", "policy",
    "health", "rollout", "sampler", "guard", "time", "budget", "Model metrics", "System metrics",
)  # fmt: skip


def sqlite_path(uri: Any) -> Path | None:
    """The file of a ``sqlite:///`` tracking URI (None for any other store)."""
    if isinstance(uri, str) and uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


@contextlib.contextmanager
def store_lock(uri: Any) -> Iterator[None]:
    """An exclusive lock per sqlite store (no-op for other stores). The lock file lives in the
    temporary folder, so nothing is left in the working directory."""
    if sqlite_path(uri) is None:
        yield
        return
    import fcntl

    key = hashlib.sha1(str(uri).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"curate-rl-mlflow-{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def writable(path: str | Path, field: str) -> None:
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


def _fix(path: Path) -> str:
    return f"move it away (mv {path} {path}.bad) to start a fresh store, or log elsewhere with --{FIELD} sqlite:///<other file>"


def check_store_file(path: Path) -> None:
    """An existing store file is an sqlite database whose pages all read back (a truncated or
    foreign file fails here, in milliseconds, instead of inside MLflow's migrations)."""
    if not path.exists():
        return
    if path.is_dir():
        raise ConfigError(FIELD, f"{path} is a folder, not an MLflow sqlite store; {_fix(path)}")
    if path.stat().st_size == 0:
        return  # sqlite treats an empty file as an empty database
    with open(path, "rb") as f:
        head = f.read(16)
    if head != b"SQLite format 3\x00":
        raise ConfigError(FIELD, f"{path} is not an sqlite database (an MLflow store); {_fix(path)}")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            (result,) = con.execute("pragma quick_check").fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise ConfigError(FIELD, f"{path} is a damaged sqlite database ({e}); {_fix(path)}") from None
    if result != "ok":
        raise ConfigError(FIELD, f"{path} is a damaged sqlite database ({result}); {_fix(path)}")


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux; None elsewhere or if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, to tell a reused pid apart."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def owner_tags() -> dict[str, str]:
    """The tags that name the process running a run (host, pid, the pid's start time)."""
    pid = os.getpid()
    return dict(zip(OWNER_TAGS, (socket.gethostname(), str(pid), _start_time(pid) or ""), strict=True))


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the run's owner process still runs: None when it cannot be told (another host, no
    owner tags), False when its pid is gone or now belongs to a process started later."""
    host, pid, start = (tags.get(k) for k in OWNER_TAGS)
    if host != socket.gethostname() or not (pid or "").isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    fields = _proc_stat(int(pid))
    if fields is None:
        return True  # no /proc: the pid exists, which is all that can be told
    return fields[0] != "Z" and not (start and fields[19] != start)  # a zombie, or a reused pid


def fail_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark FAILED the experiment's RUNNING runs whose owner process on this host is gone."""
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    failed = []
    for run in runs:
        if owner_alive(run.data.tags) is False:
            client.set_tag(run.info.run_id, "curate_rl.ended", "its process was gone; marked FAILED by a later run")
            client.set_terminated(run.info.run_id, "FAILED")
            failed.append(run.info.run_id)
    return failed


def runs_view() -> dict[str, Any]:
    """The runs page state of :data:`VIEW_KEY`: evaluation first, ``eval/pass_at_1`` as a table column.

    MLflow fills the charts of each section from the runs' metrics (``compareRunCharts`` starts
    empty) and keeps the sections' order because ``isAccordionReordered`` is set.
    """
    sections = [{"uuid": f"curate-rl-{n}", "name": n, "display": True, "isReordered": False} for n in SECTION_ORDER]
    return {
        "selectedColumns": ["attributes.`Source`", "attributes.`Models`", "metrics.`eval/pass_at_1`"],
        "runsExpanded": {},
        "runsPinned": [],
        "runsHidden": [],
        "runsHiddenMode": "FIRST_10_RUNS",
        "compareRunCharts": [],
        "compareRunSections": sections,
        "isAccordionReordered": True,
        "viewMaximized": False,
        "runListHidden": False,
        "groupBy": "",
        "groupsExpanded": {},
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
    }


def view_url(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The runs page of ``mlflow ui`` (default host and port) in :func:`runs_view`, as charts."""
    return f"{host}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&compareRunsMode=CHART&workflowType=machine_learning"


def experiment_tags() -> dict[str, str]:
    """The tags every experiment of an sqlite store gets: its kind (training) and the saved view."""
    view = {"name": VIEW_NAME, "createdAt": VIEW_CREATED_MS, "updatedAt": VIEW_CREATED_MS, "state": json.dumps(runs_view())}
    return {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view)}


def prepare_store(uri: Any, experiment_name: str) -> None:
    """Check, create (or migrate) the store and its experiment under the lock, and fail the runs
    of dead processes; see the module docstring. Non-sqlite stores are left to MLflow."""
    path = sqlite_path(uri)
    if path is None:
        return
    writable(Path.cwd(), "the working directory (MLflow's artifacts go to ./mlruns)")
    writable(path.parent, FIELD)
    check_store_file(path)
    import logging

    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        for name in ("alembic", "mlflow.store.db.utils"):  # "Creating initial MLflow database tables..."
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            client = MlflowClient(uri)  # opens the store: creates and migrates the schema
            exp = client.get_experiment_by_name(experiment_name)
            if exp is None:
                exp_id = client.create_experiment(experiment_name, tags=experiment_tags())
            else:
                exp_id = exp.experiment_id
                for key, value in experiment_tags().items():  # an older store gets them (or the new view)
                    if exp.tags.get(key) != value and not (key == EXPERIMENT_KIND[0] and key in exp.tags):
                        client.set_experiment_tag(exp_id, key, value)
            failed = fail_dead_runs(client, exp_id)
        except Exception as e:  # a half-migrated or foreign schema, a locked or read-only file
            first = " ".join(str(e).split())[:200]
            raise ConfigError(
                FIELD, f"{path} cannot be opened as an MLflow store ({type(e).__name__}: {first}); {_fix(path)}"
            ) from None
    for run_id in failed:
        print(f"curate-rl: run {run_id} in {path} was left RUNNING by a process that is gone; marked FAILED", file=sys.stderr)
