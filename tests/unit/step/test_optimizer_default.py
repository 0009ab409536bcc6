"""The module's default optimizer is a value (so ``--print_config`` shows it) and builds the shared
base's AdamW when the module is made in Python, as the CLI's callable does."""

from __future__ import annotations

import torch

from components.step.module import DEFAULT_OPTIMIZER, PolicyModule


def test_the_default_optimizer_spec_builds_the_shared_base_adamw():
    module = PolicyModule(model="embedded:tiny-init", export_dir=None)
    assert module.optimizer_fn is DEFAULT_OPTIMIZER
    opt = module.configure_optimizers()
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.9, 0.98), 0.0)
    assert opt.defaults["fused"] is True  # rebuilt fused, as before (components/step/module.py _fast_adam)
