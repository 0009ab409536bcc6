"""Every RNG that sampling and shuffling use, captured and restored as one value.

A checkpoint saves it (so a resumed run draws what the uninterrupted run would have drawn), RunGuard
rolls back to it, and an engine that reseeds the process while it is built (vLLM's ``LLM(...)``) puts
it back afterwards.
"""

from __future__ import annotations

from typing import Any


def rng_state() -> dict[str, Any]:
    """Every RNG that sampling and shuffling use: torch (CPU and CUDA), Python, numpy. Stored as
    tensors and plain Python values, so the checkpoint loads with ``weights_only=True``."""
    import random

    import numpy as np
    import torch

    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype("int64")),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
