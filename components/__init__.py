"""curate-rl: RL post-training of language models where the learning signal is curated.

One folder per slot of the training step (``docs/architecture.md`` draws the step through them):

- :mod:`components.types`, :mod:`components.errors`, :mod:`components.policy`
                                 the data of a step, the one-line errors, loading the policy.
- :mod:`components.data`         task sources, the pass-rate pre-filter, the LightningDataModule.
- :mod:`components.engines`      rollout engines (Hugging Face ``generate``; vLLM behind an extra).
- :mod:`components.rewards`      the task's verifier and DRO's R3.
- :mod:`components.samplers`     how many rollouts each prompt gets and which are kept; hints.
- :mod:`components.callbacks`    signal callbacks (group filters, prompt and token weights) and run lifecycle.
- :mod:`components.algos`        pure maths: advantage estimators, policy losses, selection rules.
- :mod:`components.step`         the LightningModule, the update, and the step's metrics.
- :mod:`components.analysis`     regimes and warm starts, ablation sweeps, the claims table.
- :mod:`components.cli`          the ``curate-rl`` LightningCLI.
"""

__version__ = "0.1.0"
