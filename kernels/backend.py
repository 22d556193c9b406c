"""Which implementation a public op runs: its Triton kernel or its plain-torch reference.

Every public op in `kernels/` asks `use_triton(*tensors)` once, in its forward:

* ``auto`` (default): Triton when every tensor is on CUDA, the torch reference otherwise
  (so on a CPU the engine runs the references, slowly but correctly);
* ``triton``: always Triton. Tests use it on CPU tensors with ``TRITON_INTERPRET=1``,
  which must be set before ``triton`` is first imported (tests/conftest.py does this);
* ``reference``: always the torch reference, for A/B comparisons on a GPU.

The mode is a context variable, so it is scoped, never a global flag. The environment variable
``ENGINE_KERNELS`` (auto | triton | reference) sets the default for a whole process, e.g. a
benchmark or a training run started with ``ENGINE_KERNELS=reference``.

The decision is taken in the forward only: an op that chose Triton runs a Triton backward
through its ``autograd.Function``; one that chose the reference is differentiated by autograd.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

MODES = ("auto", "triton", "reference")


def _default_mode() -> str:
    mode = os.environ.get("ENGINE_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"ENGINE_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("kernel_mode", default=_default_mode())


def kernel_mode() -> str:
    """The mode in force: ``auto``, ``triton`` or ``reference``."""
    return _MODE.get()


@contextlib.contextmanager
def set_kernel_mode(mode: str) -> Iterator[None]:
    """Run the enclosed code with ``mode`` (auto | triton | reference)."""
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}: expected one of {', '.join(MODES)}")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def force_triton() -> contextlib.AbstractContextManager[None]:
    """Always run the Triton kernels (CPU tensors need ``TRITON_INTERPRET=1``)."""
    return set_kernel_mode("triton")


def use_reference() -> contextlib.AbstractContextManager[None]:
    """Always run the plain-torch references (the A/B switch)."""
    return set_kernel_mode("reference")


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether an op called on ``tensors`` (``None`` entries ignored) should run its Triton kernel."""
    mode = _MODE.get()
    if mode == "reference":
        return False
    if mode == "triton":
        return True
    present = [t for t in tensors if t is not None]
    return bool(present) and all(t.is_cuda for t in present)
