"""vLLM's SamplingParams: the fields the engine sets, with vLLM's own validation messages."""

_SAMPLING_EPS = 1e-5


class SamplingParams:
    def __init__(
        self,
        *,
        n: int = 1,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        max_tokens: int | None = 16,
        min_tokens: int = 0,
        logprobs: int | None = None,
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self.n, self.temperature, self.top_p, self.top_k, self.min_p = n, temperature, top_p, top_k, min_p
        self.presence_penalty, self.frequency_penalty, self.repetition_penalty = (
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
        )
        self.seed, self.ignore_eos, self.max_tokens, self.min_tokens = seed, ignore_eos, max_tokens, min_tokens
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.stop_token_ids = list(stop_token_ids or [])
        self.logprobs, self.include_stop_str_in_output, self.skip_special_tokens = (
            logprobs,
            include_stop_str_in_output,
            skip_special_tokens,
        )
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}.")
        if temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {temperature}.")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        if top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), 0 (disable) or at least 1, got {top_k}.")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        if temperature < _SAMPLING_EPS:
            # Zero temperature means greedy sampling.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {n}.")
