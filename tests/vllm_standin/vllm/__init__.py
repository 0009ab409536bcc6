"""Stand-in for vLLM (tests only; see tests/vllm_standin/README.md)."""

from vllm.entrypoints.llm import LLM
from vllm.sampling_params import SamplingParams

__version__ = "0.32.0+standin"
__all__ = ["LLM", "SamplingParams"]
