"""Rollout engines: contexts in, sampled completions with their sampling log-probs out (HF ``generate``, vLLM)."""
