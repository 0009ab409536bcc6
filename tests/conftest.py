import os

import pytest
import torch

from tests.engines import standin_vllm

# One thread: two threads next to another process made small models 10-60x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# No hub look-ups: every model the tests use is local (vLLM resolving a local folder's architecture
# would otherwise spend ~18 s on hub time-outs without network).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def standin():
    """`import vllm` finds tests/vllm_standin (sleep mode only: real vLLM refuses it on CPU); its
    modules leave sys.modules afterwards, so a real vLLM imported later is not shadowed."""
    with standin_vllm() as vllm:
        yield vllm
