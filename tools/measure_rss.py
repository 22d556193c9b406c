"""Peak resident memory of a CPU training run, the measurement `tools.memory_plan --device cpu` is
checked against.

    python -m tools.measure_rss [--out FILE.json] -- <python -m engine.train flags>

In this process: import torch and the engine (``engine.train`` and the recipes), read the
resident set size then (the baseline: ``VmRSS`` of /proc/self/status), run ``engine.train.main``
with the given flags, and read the peak resident set size of the process (``VmHWM``, the high-water
mark of this process's own memory map; not ``ru_maxrss``, which Linux carries over an exec from the
process that started this one: under a 3 GB pytest it read 3 GB whatever the run did). Prints, and writes to ``--out``, ``{"baseline_bytes", "peak_bytes", "increase_bytes"}``:
the increase is everything the run itself brought in — the weights as loaded, the tokenizer and
data, the adapter and its optimizer, activations, the loss — and not the interpreter and its
libraries.

Freed memory: by default glibc serves large allocations from its heap once some have been freed
(its mmap threshold grows up to 32 MiB) and keeps what is freed there, so the peak RSS becomes the
heap's high-water mark, which depends on the order of frees: 30-50 % above the live tensors in
the SmolLM2 runs of tests/tools/test_memory_plan.py. This tool first fixes the threshold at
128 KiB (``mallopt(M_MMAP_THRESHOLD)``, as ``MALLOC_MMAP_THRESHOLD_=131072`` would), so that every
large tensor is its own mapping, returned to the system when freed: the peak RSS is then the peak
of live memory, what `tools.memory_plan` predicts (and what a GPU's caching allocator holds,
less its own slack). ``--glibc-default`` measures with glibc's default behaviour instead.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``: KiB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} line in /proc/self/status (not Linux?)")


def resident_bytes() -> int:
    """The current resident set size of this process (VmRSS)."""
    return _status_bytes("VmRSS")


def peak_resident_bytes() -> int:
    """The peak resident set size of this process's memory map so far (VmHWM)."""
    return _status_bytes("VmHWM")


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024


def release_freed_memory() -> None:
    """Make glibc map every allocation of 128 KiB or more on its own, returned to the OS on free."""
    if not ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        raise OSError("mallopt(M_MMAP_THRESHOLD) failed (not glibc?); use --glibc-default")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--glibc-default", action="store_true",
                        help="keep glibc's default heap behaviour (freed memory stays resident)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the flags of python -m engine.train")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

    import engine.recipes.dpo  # noqa: F401  - the imports a run needs, before the baseline
    import engine.recipes.sft  # noqa: F401
    from engine.train import main as train_main

    if not args.glibc_default:
        release_freed_memory()
    baseline = resident_bytes()
    status = train_main(train_args)
    peak = peak_resident_bytes()
    figures = {"baseline_bytes": baseline, "peak_bytes": peak, "increase_bytes": peak - baseline}
    print(json.dumps(figures))
    if args.out:
        Path(args.out).write_text(json.dumps(figures) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
