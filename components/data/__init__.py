"""Prompts: task sources (reasoning-gym, local generators, files), the pass-rate pre-filter and the DataModule."""
