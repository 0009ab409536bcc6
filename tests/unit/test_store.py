"""The MLflow store's checks and run owners (components/store.py), without a fit."""

from __future__ import annotations

import os
import socket
import sqlite3

import pytest

from components.errors import ConfigError
from components.store import check_store_file, owner_alive, owner_tags


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
