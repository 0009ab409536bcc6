"""Regimes a user adds without code: one YAML file each, built on demand, resumable warm starts that
record how they were built, the regime named in the table, and the ablation's resume fingerprint."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from components.analysis.cost_axes import Budget
from components.analysis.plan import RunSpec, fit_command, inputs_fingerprint, plan, settings_of
from components.analysis.regimes import (
    REGIMES,
    build_regime,
    cached_report,
    get_regime,
    load_regime,
    load_regimes,
    regime_label,
)
from components.analysis.warm_start import WarmStartSpec, warm_start
from components.data.datamodule import ReasoningGymTask, default_tasks
from components.errors import ConfigError
from components.policy import load_policy
from tests.runs import ROOT

MIX = [
    {"name": "column_sum", "config": {"digits": 1, "format": "plain"}, "tag": "easy"},
    {"name": "column_sum", "config": {"digits": 2, "format": "plain"}, "tag": "hard"},
]


def _regime_file(folder: Path, name: str, model: Path, steps: int = 3) -> Path:
    """A new regime as a user writes it: a mix with its own tags, a model folder, a warm start."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.yaml"
    p.write_text(
        f"# REGIME {name}: one- and two-digit column sums with tags easy/hard. Built on first use.\n"
        f"# warm start: {{target_tag: hard, target: 1.0, max_steps: {steps}, eval_every: 2, eval_items: 8, "
        "train_pool: 64, batch_size: 8}\n"
        f"model:\n  model: {model}\n  sampling:\n    max_new_tokens: 8\n"
        f"data:\n  prefilter: null\n  tasks:\n" + "".join(f"    - {json.dumps(t)}\n" for t in MIX)
    )
    return p


def test_the_shipped_regimes_come_from_their_files_with_the_specs_they_were_built_from():
    assert set(REGIMES) == {p.stem for p in (ROOT / "configs" / "regimes").glob("*.yaml")}
    # The specs read from the files hash as the code that built the shipped and cached models did.
    assert (
        REGIMES["reasoning"].warm_start.key()
        == json.loads((ROOT / "components/assets/reasoning/regime.json").read_text())["spec_key"]
    )
    assert REGIMES["sparse"].warm_start.key() == WarmStartSpec(default_tasks(), ["d1", "d2"], "d2", 0.12, eval_every=50).key()
    assert REGIMES["reasoning"].shipped == "embedded:reasoning" and REGIMES["dense"].model == "embedded:tiny"
    assert REGIMES["filtered"].modifier and REGIMES["filtered"].warm_start is None
    assert REGIMES["sparse"].build_dir == Path(".cache/curate-rl/regimes/sparse")


def test_a_regime_added_as_one_file_is_listed_built_and_named(tmp_path):
    cfg = tmp_path / "regimes"
    model = tmp_path / "models" / "columns"
    path = _regime_file(cfg, "columns", model)
    reg = load_regimes(cfg)["columns"]
    assert reg.description.startswith("one- and two-digit column sums") and reg.build_dir == model
    assert [t.tag for t in reg.warm_start.tasks] == ["easy", "hard"] and reg.warm_start.train_tags is None
    logs: list[str] = []
    assert build_regime("columns", config_dir=cfg, log=logs.append) == str(model)
    assert cached_report("columns", config_dir=cfg)["steps"] == 3 and (model / "regime.json").exists()
    record = json.loads((model / "warm_start.json").read_text())  # how it was built, beside the weights
    assert record["spec_key"] == reg.warm_start.key() and record["seed"] == 1234 and record["steps"] == 3
    assert [t["tag"] for t in record["spec"]["tasks"]] == ["easy", "hard"] and record["data"]["train_pool"] == 64
    load_policy(str(model))
    logs.clear()
    assert build_regime("columns", config_dir=cfg, log=logs.append) == str(model) and not logs  # cached
    # The table names the regime from its file, whether composed with --regime or set by arguments.
    recipe = ROOT / "recipes" / "grpo.yaml"
    assert regime_label([recipe, path], (), [path], cfg) == "columns"
    args = ["--data.tasks", json.dumps(MIX), "--model.model", str(model)]
    assert regime_label([recipe], args, (), cfg) == "columns"
    assert regime_label([recipe], ["--data.tasks", json.dumps(MIX[:1])], (), cfg).startswith("custom (easy;")
    assert regime_label([recipe], (), (), cfg) == "custom (default mix; embedded:tiny)"  # no dense file in cfg
    assert regime_label([recipe]) == "dense" and regime_label([ROOT / "recipes" / "dro.yaml"]) == "reasoning"
    with pytest.raises(ConfigError, match="regime.*valid: \\['columns'\\]"):
        get_regime("nope", cfg)


def test_a_regime_file_with_a_bad_warm_start_names_the_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("# REGIME bad: x.\n# warm start: {target_tag: d2, targt: 0.2}\nmodel:\n  model: m\n")
    with pytest.raises(ConfigError, match="unknown fields \\['targt'\\]"):
        load_regime(p)
    p.write_text("# REGIME bad: x.\n# warm start: {target_tag: d9}\nmodel:\n  model: m\n")
    with pytest.raises(ConfigError, match="warm_start.target_tag"):
        load_regime(p)


def _spec(**kw) -> WarmStartSpec:
    tasks = [ReasoningGymTask(**t) for t in MIX]
    return WarmStartSpec(tasks, None, "hard", 1.0, max_steps=6, eval_every=2, eval_items=8, train_pool=64, batch_size=8, **kw)


def test_an_interrupted_warm_start_resumes_to_the_same_weights(tmp_path):
    warm_start(_spec(), tmp_path / "whole", log=lambda s: None)

    def stop_at_4(line: str) -> None:
        if line.startswith("step 4 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        warm_start(_spec(), tmp_path / "cut", log=stop_at_4)
    assert (tmp_path / "cut" / "warm_start.ckpt").exists() and not (tmp_path / "cut" / "config.json").exists()
    logs: list[str] = []
    warm_start(_spec(), tmp_path / "cut", log=logs.append)
    assert any("resuming the build from step 4" in x for x in logs)
    a, _ = load_policy(str(tmp_path / "whole"))
    b, _ = load_policy(str(tmp_path / "cut"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert json.loads((tmp_path / "cut" / "warm_start.json").read_text())["resumed_from_step"] == 4
    assert not (tmp_path / "cut" / "warm_start.ckpt").exists()
    # A saved state of another spec is not resumed onto.
    with pytest.raises(KeyboardInterrupt):
        warm_start(_spec(), tmp_path / "other", log=stop_at_4)
    logs.clear()
    warm_start(_spec(lr=5e-4), tmp_path / "other", log=logs.append)
    assert any("ignoring" in x and "another spec" in x for x in logs)


def test_hinted_examples_change_the_key_only_when_used():
    assert _spec().key() == _spec(hint_share=0.0, hint_levels=3).key() != _spec(hint_share=0.3).key()
    with pytest.raises(ConfigError, match="warm_start.hint_share"):
        _spec(hint_share=1.5).validate()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_warm_start_script_takes_a_file_and_defaults_train_tags_to_the_mix(tmp_path, monkeypatch, capsys):
    ws = _script("warm_start")
    mix = tmp_path / "mix.yaml"
    mix.write_text(json.dumps(MIX))
    assert [t.tag for t in ws.parse_tasks(str(mix))] == ["easy", "hard"]
    assert [t.tag for t in ws.parse_tasks(str(ROOT / "configs" / "regimes" / "reasoning.yaml"))] == ["d1", "d2", "d3"]
    assert len(ws.parse_tasks(str(ROOT / "configs" / "regimes" / "dense.yaml"))) == 3  # data.tasks null: the default mix
    assert ws.train_tags(None, "default", default_tasks()) == ["d1", "d2"]
    assert ws.train_tags(None, str(mix), []) is None and ws.train_tags("easy", str(mix), []) == ["easy"]
    # a mix without d1/d2 and the default --target-tag d2: one line naming the valid slices, no traceback
    monkeypatch.setattr(sys, "argv", ["warm_start.py", "--tasks", str(mix), "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="warm_start.target_tag: 'd2' is not a slice of the mix; valid: \\['easy', 'hard'\\]"):
        ws.main()
    monkeypatch.setattr(sys, "argv", ["warm_start.py", "--tasks", str(mix), "--train-tags", "d1,d2", "--target-tag", "hard"])
    with pytest.raises(SystemExit, match="warm_start.train_tags"):
        ws.main()
    with pytest.raises(SystemExit, match="--tasks: expected"):
        ws.parse_tasks("{not: a list}")


# ---- the ablation's resume fingerprint -------------------------------------------------------------
def _fake_run(spec: RunSpec, settings: str, root: Path, inputs: str | None) -> SimpleNamespace:
    tags = {"ablation_key": spec.key, "ablation_settings": settings, "ablation_files_sha": spec.files_sha(root)}
    if inputs is not None:
        tags["ablation_inputs_sha"] = inputs
    return SimpleNamespace(info=SimpleNamespace(status="FINISHED", run_id="old"), data=SimpleNamespace(tags=tags))


def test_resume_refuses_runs_made_from_a_rebuilt_model_or_edited_data(tmp_path):
    model, _ = load_policy("embedded:tiny")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    (tmp_path / "r.yaml").write_text(f"model:\n  model: {folder}\n")
    mix = tmp_path / "mix.yaml"
    mix.write_text(json.dumps(MIX))
    extra = ["--data.tasks", str(mix)]
    spec = RunSpec("r.yaml", (), 0)
    settings = settings_of(Budget("steps", 2), extra, 2)
    fp, what = inputs_fingerprint([tmp_path / "r.yaml"], extra)
    assert str(folder) in what and str(mix) in what
    _, env = fit_command(spec, Budget("steps", 2), ablation_id="a", tracking_uri="sqlite:////x.db", experiment="e",
                         settings=settings, extra_args=extra, root=tmp_path)  # fmt: skip
    tags = json.loads(env["MLFLOW_RUN_CONTEXT"])
    assert tags["ablation_inputs_sha"] == fp and tags["ablation_regime"].startswith("custom (easy/hard;")
    run = _fake_run(spec, settings, tmp_path, fp)
    assert plan([spec], [run], "a", settings, tmp_path, extra).done == [spec]  # same inputs: resumes
    assert plan([spec], [_fake_run(spec, settings, tmp_path, None)], "a", settings, tmp_path, extra).done == [spec]  # older run
    mix.write_text(json.dumps(MIX[:1]))  # the data file passed after -- changed
    with pytest.raises(ValueError, match="other inputs.*Use another --ablation-id"):
        plan([spec], [run], "a", settings, tmp_path, extra)
    mix.write_text(json.dumps(MIX))
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    model.save_pretrained(folder)  # the model rebuilt at the same path
    with pytest.raises(ValueError, match=f"other inputs than this run would read \\(model {folder}"):
        plan([spec], [run], "a", settings, tmp_path, extra)


def test_the_claims_table_names_each_row_by_its_regime_column(tmp_path, capsys):
    import csv

    claims = _script("claims")
    final = "eval/pass_at_1:final"
    base = {"variant": "", "n_seeds": "5", f"{final}_mean": "0.30", f"{final}_std": "0.01", "control": ""}
    rows = [
        {**base, "recipe": "grpo", "regime": "columns"},
        {**base, "recipe": "dr_grpo", "control": "grpo", "regime": "columns"},
        {**base, "recipe": "grpo_n4", "regime": ""},  # a report from before the column: the variant, else dense
        {**base, "recipe": "ada_est", "control": "grpo_n4", "regime": ""},
    ]
    report = tmp_path / "a" / "report"
    report.mkdir(parents=True)
    with (report / "table.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert claims.main(["a", "--out", str(tmp_path)]) == 0
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "`" in ln]
    assert [ln.split(" | ")[0] for ln in out] == ["| columns", "| dense"]
