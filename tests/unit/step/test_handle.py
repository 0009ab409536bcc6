"""Components see the step's handle, never the LightningModule or the Trainer (DESIGN.md).

Three kinds of check: the handle itself forwards exactly the protocol's members; a static scan of
the component code refuses a parameter or attribute that reaches the module or the trainer; and the
components that run the policy (GVM, R3, the pass-rate pre-filter) work on a fake handle that has
only the protocol's members and no Lightning at all.
"""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from components.data.datamodule import PromptDataModule, default_tasks, reasoning_tasks
from components.data.prefilter import PrefilterConfig, apply_prefilter
from components.engines.base import SamplingParams
from components.handle import StepHandle
from components.policy import load_policy
from components.rewards.r3 import R3Reward
from components.rewards.verifier import VerifierReward
from components.samplers.gvm import GVMSampler
from components.step.module_handle import ModuleHandle
from tests.fakes import ModelHandle, ScriptedHandle
from tests.runs import ROOT


def protocol_members() -> set[str]:
    """The names StepHandle declares: its annotated attributes and its methods."""
    names = set(StepHandle.__annotations__)
    names |= {n for n, v in vars(StepHandle).items() if inspect.isfunction(v) and not n.startswith("_")}
    return names


def public_members(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    policy, tok = load_policy("embedded:tiny")
    dm = PromptDataModule(tasks=default_tasks(), train_size=16, heldout_size=2, seed=0)
    dm.setup()
    return policy, tok, dm


# ---- the handle ---------------------------------------------------------------------------------------
def test_the_module_handle_forwards_exactly_the_protocol_and_nothing_else():
    assert public_members(ModuleHandle) == protocol_members()
    assert "__getattr__" not in vars(ModuleHandle)  # no pass-through to the module


def test_the_module_handle_does_not_reach_the_module():
    from components.step.module import PolicyModule

    handle = PolicyModule(model="embedded:tiny-init", export_dir=None).handle
    for name in ("trainer", "optimizers", "engine", "reward", "sampler", "manual_backward", "log_dict", "_trainer"):
        assert not hasattr(handle, name), name
    assert handle.step == 0 and handle.context_of("1 + 2 =") == handle.context_of("1 + 2 =")


def test_the_test_fakes_implement_every_member(tiny):
    policy, tok, _ = tiny
    for fake in (ScriptedHandle(), ModelHandle(policy, tok)):
        missing = {n for n in protocol_members() if not hasattr(fake, n)}
        assert not missing, f"{type(fake).__name__} lacks {sorted(missing)}"
    # the fake that GVM, R3 and the pre-filter are tested on has those members and no others
    model_handle = ModelHandle(policy, tok)
    assert {n for n in dir(model_handle) if not n.startswith("_")} == protocol_members()


# ---- a static check: no component receives or reaches the module or the trainer ----------------------
# Lightning's own lifecycle hooks keep their signatures (they receive trainer and pl_module).
LIGHTNING_HOOKS = {n for n in dir(L.Callback) if n.startswith(("on_", "setup", "teardown", "state_dict", "load_state"))}
LIGHTNING_HOOKS |= {n for n in dir(L.LightningDataModule) if not n.startswith("_")}
FORBIDDEN_PARAMS = {"module", "pl_module", "trainer", "lightning_module"}
FORBIDDEN_ATTRS = {"trainer", "lightning_module", "_forward_logprobs", "_trainer"}
# Components the rule covers in full; the run callbacks (lifecycle, checkpoint, budget) manage
# the Trainer's own run, so only their signal hooks are checked.
COMPONENT_DIRS = ("samplers", "rewards", "algos", "engines", "callbacks")
COMPONENT_FILES = ("handle.py", "data/prefilter.py", "step/update.py")
RUN_CALLBACKS = ("callbacks/lifecycle.py", "callbacks/checkpoint.py", "callbacks/budget.py")
SIGNAL_HOOKS = {"on_groups", "on_advantages", "on_micro_batch"}


def _component_files() -> list[Path]:
    base = ROOT / "components"
    files = [p for d in COMPONENT_DIRS for p in sorted((base / d).glob("*.py"))]
    return files + [base / f for f in COMPONENT_FILES]


def _is_lightning_hook(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A Lightning callback hook: its name, and ``trainer`` right after ``self`` (so a sampler's own
    ``setup(self, module)`` is not one)."""
    args = [a.arg for a in fn.args.args]
    return fn.name in LIGHTNING_HOOKS and fn.name not in SIGNAL_HOOKS and args[1:2] == ["trainer"]


def _violations(source: str, rel: str) -> list[str]:
    out = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if (rel in RUN_CALLBACKS and fn.name not in SIGNAL_HOOKS) or _is_lightning_hook(fn):
            continue
        args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
        out += [f"{rel}:{fn.lineno} {fn.name}({a.arg})" for a in args if a.arg in FORBIDDEN_PARAMS]
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRS:
                out.append(f"{rel}:{node.lineno} {fn.name}: .{node.attr}")
            if isinstance(node, ast.Name) and node.id in FORBIDDEN_PARAMS:
                out.append(f"{rel}:{node.lineno} {fn.name}: {node.id}")
    return out


def test_no_component_receives_or_reaches_the_module_or_the_trainer():
    files = _component_files()
    assert len(files) > 20  # the scan really covers the component folders
    bad = [v for f in files for v in _violations(f.read_text(), f.relative_to(ROOT / "components").as_posix())]
    assert not bad, "components must use the step handle (components/handle.py):\n" + "\n".join(bad)


def test_the_scan_catches_a_component_that_reaches_the_module():
    probe = (
        "class S:\n"
        "    def setup(self, module):\n        self.m = module\n"
        "    def collect(self, prompts, handle):\n        return handle.lightning_module\n"
        "    def on_train_start(self, trainer, pl_module):\n        self.t = trainer\n"  # a Lightning hook: allowed
        "def on_groups(groups, module):\n    return groups\n"
    )
    bad = _violations(probe, "samplers/probe.py")
    assert any("setup(module)" in b for b in bad) and any(".lightning_module" in b for b in bad)
    assert any("on_groups(module)" in b for b in bad) and not any("on_train_start" in b for b in bad)


# ---- the components that run the policy, on a fake handle without Lightning ---------------------------
def test_gvm_computes_its_gradient_norms_through_a_fake_handle(tiny):
    policy, tok, dm = tiny
    reward = VerifierReward()
    handle = ModelHandle(policy, tok, reward=reward, pool=dm.train_pool.prompts)
    reward.setup(handle, dm.verifier)
    sampler = GVMSampler(rollouts_per_prompt=4, pilot=4, n_min=2, grad_samples=2)
    sampler.setup(handle)
    torch.manual_seed(1)
    groups = sampler.collect(dm.train_pool.prompts[:6], handle)
    assert groups and sampler.grads, "some prompt had an accepted rollout, so G was computed"
    assert all(g > 0 and math.isfinite(g) for g, _ in sampler.grads.values())
    assert handle._metrics["budget/tokens_forwarded"] > 0  # the gradient passes went through the handle
    assert all(p.grad is None for p in policy.parameters())  # the optimizer's gradients are untouched


def test_r3_scores_through_a_fake_handle():
    torch.manual_seed(0)
    policy, tok = load_policy("embedded:reasoning")
    dm = PromptDataModule(tasks=reasoning_tasks(), train_size=8, heldout_size=2, seed=0)
    dm.setup()
    reward = R3Reward(marker="####", target="reference")
    handle = ModelHandle(policy, tok, reward=reward, sampling=SamplingParams(max_new_tokens=56), pool=dm.train_pool.prompts)
    reward.setup(handle, dm.verifier)  # validates every prompt's length through the handle
    outs = handle.sample(dm.train_pool.prompts[:2], [4, 4])
    rewards = [r.reward for rs in outs for r in rs]
    assert all(math.isfinite(x) and x <= 0 for x in rewards)  # a weighted mean of log-probs
    assert len(set(rewards)) > 1
    assert handle._metrics["dro/tokens_forwarded"] > 0 and math.isfinite(handle._metrics["dro/r3_mean"])


def test_the_prefilter_filters_with_the_policy_behind_a_fake_handle(tiny, tmp_path):
    policy, tok, dm = tiny
    handle = ModelHandle(policy, tok, sampling=SamplingParams(max_new_tokens=8))
    prompts = dm.train_pool.prompts
    cfg = PrefilterConfig(k=4, cache_dir=str(tmp_path))
    kept, weights, report = apply_prefilter(cfg, prompts, [1.0] * len(prompts), dm.verifier, handle)
    assert report.kept == len(kept) == len(weights) and not report.cache_hit
    assert report.kept + report.dropped_low + report.dropped_high == len(prompts)
    again = apply_prefilter(cfg, prompts, [1.0] * len(prompts), dm.verifier, handle)
    assert again[2].cache_hit and [p.uid for p in again[0]] == [p.uid for p in kept]
