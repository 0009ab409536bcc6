"""curate-rl: RL post-training of language models where the learning signal is curated.

The package is organised one concept per module:

- :mod:`components.types`        Prompt, Rollout, Group: the data that flows through one step.
- :mod:`components.data`         task sources and the LightningDataModule.
- :mod:`components.rewards`      rewards (the task's own verifier).
- :mod:`components.engine`       rollout engines (Hugging Face ``generate``; vLLM behind an extra).
- :mod:`components.advantages`   advantage estimators, pure tensor functions registered by name.
- :mod:`components.losses`       policy losses and loss aggregation, pure tensor functions.
- :mod:`components.samplers`     how many rollouts each prompt gets and which are kept.
- :mod:`components.callbacks`    signal callbacks: group filters and token re-weighting.
- :mod:`components.module`       the LightningModule that runs one training step.
- :mod:`components.cli`          the ``curate-rl`` LightningCLI.
"""

__version__ = "0.1.0"
