"""Experiment tooling outside the training step: regimes and warm starts, ablation sweeps, the claims table."""
