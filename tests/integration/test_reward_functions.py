"""A reward given as plain Python functions (``model.reward: pkg.module:function``) trains."""

from __future__ import annotations

import torch

from components.cli import build_cli
from tests.runs import ROOT, metrics_of

MODULE = '''
def even_codes(prompts, completions, answer, **kwargs):
    """1 for a completion whose character codes sum to an even number: mixed within a group, so
    GRPO has a signal."""
    return [float(sum(map(ord, c)) % 2 == 0) for c in completions]


def half(prompts, completions, answer, **kwargs):
    return [0.5] * len(completions)
'''


def test_a_weighted_list_of_plain_functions_trains(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    reward = '{"class_path": "components.rewards.functions.FunctionReward", "init_args": {"funcs": ["myrewards:even_codes", "myrewards:half"], "weights": [2.0, 1.0]}}'
    args = ["fit", "--config", str(ROOT / "recipes" / "grpo.yaml"), "--model.reward", reward, "--trainer.max_steps", "2"]
    args += ["--data.train_size", "16", "--data.heldout_size", "4", "--data.batch_size", "4", "--model.sampler.group_size", "4"]
    args += [
        "--model.eval.at_start",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--model.log_completions_every_n_steps",
        "0",
    ]
    from components.policy import load_policy

    before = load_policy("embedded:tiny")[0].state_dict()
    cli = build_cli(args)
    after = cli.model.policy.state_dict()
    assert type(cli.model.reward).__name__ == "FunctionReward"
    m = metrics_of(tmp_path / "mlflow.db")
    # every reward is 0.5 (odd) or 2.5 (even): the step means lie between, and groups were mixed
    assert all(0.5 <= v <= 2.5 for v in m["reward/mean"]) and max(m["gate/open_frac"]) > 0
    assert any(not torch.equal(before[k], after[k]) for k in before), "parameters did not change"


def test_one_function_name_is_a_reward(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(ROOT / "recipes" / "grpo.yaml"), "--model.reward", "myrewards:even_codes"], run=False)
    assert cli.model.reward.names == ["myrewards:even_codes"] and cli.model.reward.weights == [1.0]
