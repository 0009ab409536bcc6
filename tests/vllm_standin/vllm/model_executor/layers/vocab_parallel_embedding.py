"""Stand-in: the name the engine checks tied layers against (the stand-in's layers have no quant_method)."""


class UnquantizedEmbeddingMethod:
    def process_weights_after_loading(self, layer) -> None:
        return None
