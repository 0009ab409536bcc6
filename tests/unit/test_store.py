"""The MLflow store's checks and run owners (components/store.py), without a fit."""

from __future__ import annotations

import json
import os
import socket
import sqlite3

import pytest

from components.errors import ConfigError
from components.store import (
    VIEW_KEY,
    check_store_file,
    experiment_tags,
    owner_alive,
    owner_tags,
    prepare_store,
    runs_view,
    view_url,
)


def test_owner_of_this_process_is_alive_and_a_reused_or_foreign_pid_is_told_apart():
    tags = owner_tags()
    assert tags["curate_rl.host"] == socket.gethostname() and tags["curate_rl.pid"] == str(os.getpid())
    assert owner_alive(tags) is True
    assert owner_alive({**tags, "curate_rl.pid_start": "1"}) is False  # the pid now belongs to a later process
    assert owner_alive({**tags, "curate_rl.host": "another-host"}) is None  # cannot be told from here
    assert owner_alive({}) is None  # a run from before owners were recorded


def test_a_gone_pid_is_dead():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert owner_alive({**owner_tags(), "curate_rl.pid": str(pid), "curate_rl.pid_start": ""}) is False


def test_store_file_checks(tmp_path):
    good = tmp_path / "good.db"
    con = sqlite3.connect(good)
    con.execute("create table t (x)")
    con.executemany("insert into t values (?)", [("x" * 500,)] * 200)
    con.commit()
    con.close()
    check_store_file(good)
    check_store_file(tmp_path / "absent.db")
    (tmp_path / "empty.db").write_bytes(b"")
    check_store_file(tmp_path / "empty.db")
    (tmp_path / "text.db").write_text("hello\n")
    with pytest.raises(ConfigError, match=r"text.db is not an sqlite database.*mv "):
        check_store_file(tmp_path / "text.db")
    (tmp_path / "cut.db").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(ConfigError, match=r"cut.db is a damaged sqlite database"):
        check_store_file(tmp_path / "cut.db")


def test_the_experiments_saved_view_puts_evaluation_first():
    """MLflow sorts chart sections alphabetically (budget/* first); the saved view's order is ours,
    and its envelope is the one MLflow 3.17's views menu reads (name, createdAt, state as JSON)."""
    state = runs_view()
    names = [s["name"] for s in state["compareRunSections"]]
    assert names[:2] == ["eval", "eval/pass_at_1"] and names.index("budget") > names.index("reward")
    assert len(set(names)) == len(names) and state["isAccordionReordered"] is True and state["compareRunCharts"] == []
    assert "metrics.`eval/pass_at_1`" in state["selectedColumns"]
    tags = experiment_tags()
    view = json.loads(tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert view["name"] and isinstance(view["createdAt"], int) and json.loads(view["state"]) == state
    assert tags == experiment_tags()  # the same value at every start: an existing store is not rewritten
    assert view_url("3").endswith(
        f"/#/experiments/3/runs?viewStateShareKey={VIEW_KEY}&compareRunsMode=CHART&workflowType=machine_learning"
    )


def test_an_existing_experiment_gets_the_kind_and_view_and_keeps_a_kind_set_by_hand(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("old")
    client.create_experiment("mine", tags={"mlflow.experimentKind": "genai_development"})
    prepare_store(uri, "old")
    prepare_store(uri, "mine")
    prepare_store(uri, "new")
    for name, kind in (("old", "custom_model_development"), ("mine", "genai_development"), ("new", "custom_model_development")):
        tags = client.get_experiment_by_name(name).tags
        assert tags["mlflow.experimentKind"] == kind
        assert tags[f"mlflow.sharedViewState.{VIEW_KEY}"] == experiment_tags()[f"mlflow.sharedViewState.{VIEW_KEY}"]
