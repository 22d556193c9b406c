"""fp32 -> a narrower float inside a Triton kernel, rounded to nearest even on every backend.

GPUs round a ``.to(tl.bfloat16)`` to nearest even; the Triton interpreter truncates it. With
``EMULATE_RNE`` set, `cast_rne` first rounds the fp32 bits to the nearest bf16 (ties to even)::

    bits' = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000

so the cast that follows is exact and the interpreter writes the GPU's bits. This is exact RNE for
every finite value (a NaN may change payload). Other target dtypes are cast as they are.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast_rne(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """``x`` (fp32) in ``dtype``, rounded to nearest even (module docstring)."""
    if EMULATE_RNE:  # nested ifs: constexpr `and` is not supported by every Triton release
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
