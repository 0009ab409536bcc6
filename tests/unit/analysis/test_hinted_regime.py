"""SAGE's hint-reading regime (configs/regimes/hinted.yaml): a warm start that also trains on hinted
prompts in SAGE's form, and the per-level hinted pass rate that checks SAGE's premise."""

from __future__ import annotations

import dataclasses

import torch

from components.analysis.regimes import REGIMES
from components.analysis.warm_start import WarmStartSpec, hinted_text, measure_hinted_pass_rates, prompt_hints, warm_start
from components.data.datamodule import PromptDataModule, reasoning_tasks
from components.data.tasks import ANSWER_MARKER
from components.policy import load_policy
from components.samplers.hints import PrefixHint
from components.samplers.sage import SAGEHints


def _pool(n: int = 400) -> PromptDataModule:
    dm = PromptDataModule(tasks=reasoning_tasks(), train_size=n, heldout_size=8, seed=5)
    dm.setup()
    return dm


def test_warm_start_hints_are_sages_hints_partial_and_never_the_final_answer():
    sage = SAGEHints(PrefixHint(use_answer=True))  # what recipes/sage.yaml builds at RL time
    for p in _pool().train_pool.prompts:
        h = prompt_hints(p, 3)
        assert h == PrefixHint(use_answer=True).hints([p], 3, None)[0] and set(h) == {1, 2, 3}
        assert len(h[1]) < len(h[2]) < len(h[3]) < len(p.reference.strip())  # stronger with the level, never all
        assert f"{ANSWER_MARKER} {p.answer}" not in h[3]  # a partial solution, never the final answer
        assert hinted_text(p, h[2]) == sage.hinted_text(p, h[2])  # the prompt SAGE's sampler builds


def _tiny(**kw) -> WarmStartSpec:
    return WarmStartSpec(reasoning_tasks(), ["d1", "d2"], "d2", 1.0, max_positions=192, max_steps=2, eval_every=2,
                         eval_items=4, eval_samples=1, train_pool=64, batch_size=4, **kw)  # fmt: skip


def test_a_hinted_warm_start_trains_on_hinted_prompts_and_measures_each_level(tmp_path):
    warm_start(_tiny(hint_share=1.0), tmp_path / "hinted", log=lambda s: None)
    warm_start(_tiny(), tmp_path / "plain", log=lambda s: None)
    a, tok = load_policy(str(tmp_path / "hinted"))
    b, _ = load_policy(str(tmp_path / "plain"))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # other inputs
    dm = PromptDataModule(tasks=reasoning_tasks(), train_size=20, heldout_size=6, seed=0)
    dm.setup()
    rates = measure_hinted_pass_rates(a, tok, dm, max_new_tokens=8, samples=1)
    assert list(rates) == ["level_0", "level_1", "level_2", "level_3"]
    assert all(0.0 <= v <= 1.0 for r in rates.values() for v in r.values()) and all("all" in r for r in rates.values())


def test_the_hinted_regime_file_builds_a_model_whose_context_fits_a_level_3_hint(tmp_path):
    reg = REGIMES["hinted"]
    spec = reg.warm_start
    assert (
        spec.hint_share == 0.6
        and spec.hint_target == "rest"
        and spec.max_positions == 192
        and reg.tasks == spec.tasks == reasoning_tasks()
    )
    # The width check of a real build (every hinted training prompt plus the answer fits), without training.
    small = dataclasses.replace(spec, max_steps=0, train_pool=2000, eval_items=8)
    warm_start(small, tmp_path / "m", log=lambda s: None)
    assert (tmp_path / "m" / "config.json").exists()


def test_with_hint_target_rest_the_target_continues_the_partial_solution():
    from components.analysis.warm_start import _target_after, _target_ids

    _, tok = load_policy("embedded:tiny")
    cut_marker = 0
    for p in _pool(200).train_pool.prompts:
        ref = p.reference.strip()
        for hint in prompt_hints(p, 3).values():
            rest = tok.decode(_target_after(tok, p, hint, "rest")[:-1])
            if ANSWER_MARKER in ref[len(hint) :]:
                assert hint + rest == ref  # the hint, then the rest of the solution: the verifier reads the end
            else:  # the hint cut into the marker: the completion must still hold all of it
                cut_marker += 1
                assert _target_after(tok, p, hint, "rest") == _target_ids(tok, p)
            assert _target_after(tok, p, hint, "whole") == _target_ids(tok, p)
    assert cut_marker > 0  # short 1-digit references at level 3
    assert _tiny(hint_target="whole").key() == _tiny().key() != _tiny(hint_target="rest").key()
