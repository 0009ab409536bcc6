"""Stand-in for vLLM's in-place reload (``vllm.model_executor.model_loader.reload``). The stand-in's
model keeps plain parameters (no kernel repacking, as for an unquantized model on GPU), so there is
nothing to put back before loading or to re-process after it."""


def initialize_layerwise_reload(model) -> None:
    model.reloading = True


def finalize_layerwise_reload(model, model_config) -> None:
    model.reloading = False
