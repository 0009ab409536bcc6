"""Rewards: the task's own verifier and DRO's R3; any ``Reward`` subclass plugs in by ``class_path``."""
