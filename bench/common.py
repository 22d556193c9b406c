"""Shared utilities for the kernel microbenchmarks in ``bench/bench_<op>.py``.

A benchmark times each *provider* (``torch`` reference, our ``triton`` kernel, a peer library) on
each shape, and writes one JSON file under ``bench/results/``. Typical use::

    from bench.common import Record, bench_device, copy_bandwidth_gbps, measure, write_results

    device = bench_device()                      # "cuda" when available, else "cpu"
    copy_bw = copy_bandwidth_gbps(device)        # measured device-to-device copy, GB/s
    records = []
    for shape in shapes:
        timing = measure(lambda: op(x), device)  # quantiles in ms, peak memory in bytes
        records.append(Record(op="nf4_dequant", provider="triton", shape=shape, mode="forward",
                              timing=timing, bytes_moved=nbytes, copy_bw_gbps=copy_bw))
    path = write_results("nf4", records, notes="...")

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, quantiles of
many repetitions); on a CPU, ``time.perf_counter`` around each call. Peak memory: the CUDA
allocator's peak during one call minus what was allocated before it (``None`` on a CPU, where
torch keeps no allocator statistics). Effective bandwidth = bytes the op must read and write /
median time, and its share of the measured copy bandwidth (a copy reads and writes each byte once,
so it is the practical ceiling of a memory-bound kernel).

Each JSON file carries the environment (device name, torch and triton versions, git commit,
date) so results from different machines can be told apart. Run benchmarks as modules from the
repository root: ``python -m bench.bench_nf4``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """Quantiles of the time of one call, in milliseconds, and its peak extra memory."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_bytes: int | None = None


@dataclass
class Record:
    """One measured (op, provider, shape, mode) point; ``bytes_moved`` feeds the bandwidth."""

    op: str
    provider: str
    shape: Sequence[int]
    mode: str
    timing: Timing
    bytes_moved: int | None = None
    copy_bw_gbps: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        row = {
            "op": self.op, "provider": self.provider, "shape": list(self.shape), "mode": self.mode,
            **dataclasses.asdict(self.timing), **self.extra,
        }
        if self.bytes_moved is not None:
            gbps = effective_gbps(self.bytes_moved, self.timing.median_ms)
            row["bytes_moved"] = self.bytes_moved
            row["gbps"] = round(gbps, 2)
            if self.copy_bw_gbps:
                row["share_of_copy_bw"] = round(gbps / self.copy_bw_gbps, 4)
        return row


def bench_device() -> str:
    """``"cuda"`` when a GPU is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, warmup: int = 25, rep: int = 100,
            cpu_reps: int = 5) -> tuple[float, float, float]:
    """(median, p20, p80) time of ``fn()`` in ms.

    CUDA: ``triton.testing.do_bench`` with ``warmup``/``rep`` in milliseconds of GPU time.
    CPU: one warm-up call, then ``cpu_reps`` wall-clock measurements.
    """
    if device.startswith("cuda"):
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
        return float(p50), float(p20), float(p80)
    fn()
    samples = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(samples, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak memory one call of ``fn()`` allocates above what was live before it (CUDA only)."""
    if not device.startswith("cuda"):
        return None
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    _synchronize(device)
    return int(torch.cuda.max_memory_allocated() - before)


def measure(fn: Callable[[], object], device: str, **timing_kwargs) -> Timing:
    """Time ``fn`` (see `time_fn`) and measure its peak extra memory."""
    p50, p20, p80 = time_fn(fn, device, **timing_kwargs)
    return Timing(round(p50, 5), round(p20, 5), round(p80, 5), peak_memory_bytes(fn, device))


def effective_gbps(bytes_moved: int, ms: float) -> float:
    """Bytes read + written per second, in GB/s (1 GB = 1e9 bytes)."""
    return bytes_moved / (ms * 1e-3) / 1e9


def copy_bandwidth_gbps(device: str, nbytes: int | None = None) -> float:
    """Measured device copy bandwidth: ``dst.copy_(src)`` moves 2 * nbytes (read + write)."""
    nbytes = nbytes or (1 << 30 if device.startswith("cuda") else 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    p50, _, _ = time_fn(lambda: dst.copy_(src), device)
    return effective_gbps(2 * nbytes, p50)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=RESULTS_DIR.parent, capture_output=True,
                             text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def environment(device: str) -> dict:
    """Device name, library versions, git commit and UTC date of this run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or "cpu")
    return {
        "device": device, "device_name": name, "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "git_commit": _git_commit(), "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(bench_name: str, records: Sequence[Record], device: str, notes: str = "",
                  copy_bw_gbps: float | None = None, results_dir: pathlib.Path = RESULTS_DIR) -> pathlib.Path:
    """Write ``{environment, notes, copy_bw_gbps, results: [...]}`` to
    ``results_dir/<bench_name>-<device name>-<UTC date>.json`` and return the path."""
    env = environment(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device_name"]).strip("-").lower() or device
    stamp = env["date"].replace(":", "").replace("+0000", "Z")
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{bench_name}-{slug}-{stamp}.json"
    payload = {"bench": bench_name, "environment": env, "notes": notes, "copy_bw_gbps": copy_bw_gbps,
               "results": [r.to_json() for r in records]}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def format_table(records: Sequence[Record]) -> str:
    """A plain-text table of the records for the terminal."""
    lines = [f"{'op':<14}{'provider':<14}{'mode':<9}{'shape':<22}{'median ms':>11}{'GB/s':>9}{'%copy':>7}{'peak MiB':>10}"]
    for r in records:
        row = r.to_json()
        gbps = f"{row['gbps']:.1f}" if "gbps" in row else "-"
        share = f"{100 * row['share_of_copy_bw']:.0f}" if "share_of_copy_bw" in row else "-"
        peak = f"{r.timing.peak_mem_bytes / 2**20:.1f}" if r.timing.peak_mem_bytes is not None else "-"
        lines.append(f"{r.op:<14}{r.provider:<14}{r.mode:<9}{str(tuple(r.shape)):<22}"
                     f"{r.timing.median_ms:>11.4f}{gbps:>9}{share:>7}{peak:>10}")
    return "\n".join(lines)
