"""Kernel microbenchmarks (``bench/bench_<op>.py``), their shared helpers and ``bench.run_all``.

On a machine without CUDA our Triton kernels can only run in Triton's interpreter, which must be
switched on before ``triton`` is first imported: importing any ``bench`` module does it here, once,
so that every benchmark (and ``run_all``) sees the same setting. The interpreter's timings measure
Python, not a GPU; the benchmarks say so in their notes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
