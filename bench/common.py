"""Shared utilities for the kernel microbenchmarks in ``bench/bench_<op>.py``.

A benchmark times each *provider* (``torch`` reference, ``torch.compile``, ``ours`` — our Triton
kernel — and peer libraries) on each shape, in the modes ``forward`` (a training forward, grad
enabled), ``backward`` (the backward alone, on a retained graph) and ``full`` (both), and writes
one JSON file under ``bench/results/``. A benchmark file only defines its shapes, inputs and
providers; the loop lives here::

    args = bench_parser(__doc__).parse_args(argv)
    device, copy_bw = bench_device(), copy_bandwidth_gbps(bench_device())
    records = []
    for shape in shapes:
        records += measure_modes("swiglu", {"torch": swiglu_ref, "ours": forced_triton(swiglu)},
                                 lambda: make_inputs(shape), shape, device,
                                 bytes_moved={"forward": ..., "backward": ..., "full": ...},
                                 copy_bw_gbps=copy_bw, quick=args.quick)
    report("swiglu", records, device, args, notes="...", copy_bw_gbps=copy_bw)

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, quantiles of
many repetitions); on a CPU, ``time.perf_counter`` around each call. Peak memory: the CUDA
allocator's peak during one call minus what was allocated before it (``None`` on a CPU, where
torch keeps no allocator statistics). Effective bandwidth = bytes the op must read and write /
median time, and its share of the measured copy bandwidth (a copy reads and writes each byte once,
so it is the practical ceiling of a memory-bound kernel).

Each JSON file carries the environment (device name, torch and triton versions, git commit,
date) so results from different machines can be told apart. Every row has the same fields: op,
provider, shape, mode, median_ms, p20_ms, p80_ms, peak_mem_bytes, dtype, the bench's own extras
and, for memory-bound ops, bytes_moved, gbps and share_of_copy_bw. Run benchmarks as modules from
the repository root: ``python -m bench.bench_nf4``, or all of them: ``python -m bench.run_all``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from bench.targets import check, format_headlines
from kernels.backend import force_triton

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)
MODES = ("forward", "backward", "full")
QUICK_TIMING = {"warmup": 10, "rep": 40, "cpu_reps": 3}  # --quick: shorter do_bench windows


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
                  copy_bw_gbps: float | None = None, results_dir: pathlib.Path = RESULTS_DIR,
                  targets: Sequence[dict] = (), extra: Mapping | None = None) -> pathlib.Path:
    """Write ``{environment, notes, copy_bw_gbps, results: [...], targets: [...], **extra}`` to
    ``results_dir/<bench_name>-<device name>-<UTC date>.json`` and return the path."""
    env = environment(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device_name"]).strip("-").lower() or device
    stamp = env["date"].replace(":", "").replace("+0000", "Z")
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{bench_name}-{slug}-{stamp}.json"
    payload = {"bench": bench_name, "environment": env, "notes": notes, "copy_bw_gbps": copy_bw_gbps,
               "results": [r.to_json() for r in records], "targets": list(targets), **(extra or {})}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def format_table(records: Sequence[Record]) -> str:
    """A plain-text table of the records for the terminal."""
    lines = [f"{'op':<14}{'provider':<14}{'mode':<9}{'shape':<22}{'median ms':>11}{'GB/s':>9}{'%copy':>7}"
             f"{'peak MiB':>10}"]
    for r in records:
        row = r.to_json()
        gbps = f"{row['gbps']:.1f}" if "gbps" in row else "-"
        share = f"{100 * row['share_of_copy_bw']:.0f}" if "share_of_copy_bw" in row else "-"
        peak = f"{r.timing.peak_mem_bytes / 2**20:.1f}" if r.timing.peak_mem_bytes is not None else "-"
        lines.append(f"{r.op:<14}{r.provider:<14}{r.mode:<9}{str(tuple(r.shape)):<22}"
                     f"{r.timing.median_ms:>11.4f}{gbps:>9}{share:>7}{peak:>10}")
    return "\n".join(lines)


# --- providers and modes: the loop every kernel benchmark shares -------------------------------

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_NOTE = ("CPU run at small shapes: the timings say nothing about a GPU (ours, where it runs, "
            "runs in the Triton interpreter); do not commit these results")


@dataclass
class Inputs:
    """What a provider is called with, ``fn(*args)``; ``wrt``: the tensors to differentiate;
    ``grad_out``: the upstream gradient — a tensor, a tuple (one per output), or ``None`` when the
    provider returns a scalar loss."""

    args: tuple
    wrt: tuple = ()
    grad_out: object = None


def _mode_call(mode: str, fn: Callable, inputs: Inputs) -> Callable[[], object]:
    """The zero-argument call timed for ``mode``."""
    if mode == "forward":
        return lambda: fn(*inputs.args)
    if not inputs.wrt:
        raise ValueError(f"mode {mode!r} needs Inputs.wrt, the tensors to differentiate")
    if mode == "full":
        return lambda: torch.autograd.grad(fn(*inputs.args), inputs.wrt, inputs.grad_out)
    if mode == "backward":
        out = fn(*inputs.args)  # one graph, built once and retained: each call runs the backward alone
        return lambda: torch.autograd.grad(out, inputs.wrt, inputs.grad_out, retain_graph=True)
    raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")


def measure_modes(op: str, providers: Mapping[str, Callable], make_inputs: Callable[[], Inputs],
                  shape: Sequence[int], device: str, *, modes: Sequence[str] = MODES,
                  bytes_moved: Mapping[str, int] | None = None, copy_bw_gbps: float | None = None,
                  extra: Mapping | None = None, quick: bool = False) -> list[Record]:
    """Time every provider in every mode on one shape and return one `Record` per (provider, mode).

    Each provider gets fresh inputs from ``make_inputs()``, so no gradient or graph of another
    provider stays alive under its peak memory. ``bytes_moved[mode]`` (memory-bound ops) feeds the
    bandwidth columns. A mode a provider cannot run — a compiled graph refusing a retained
    backward, CUDA out of memory — is printed and left out rather than ending the benchmark.
    """
    timing_kwargs = QUICK_TIMING if quick else {}
    records = []
    for name, fn in providers.items():
        inputs = make_inputs()
        for mode in modes:
            try:
                timing = measure(_mode_call(mode, fn, inputs), device, **timing_kwargs)
            except RuntimeError as err:
                print(f"{op} {name} {mode} {tuple(shape)}: not measurable ({str(err).splitlines()[0]})")
                continue
            records.append(Record(op, name, shape, mode, timing, copy_bw_gbps=copy_bw_gbps,
                                  bytes_moved=bytes_moved[mode] if bytes_moved else None,
                                  extra=dict(extra or {})))
        del inputs
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # one provider's cached blocks must not hide another's peak
    return records


def forced_triton(fn: Callable) -> Callable:
    """``fn`` run under `kernels.backend.force_triton` (on a CPU: in the Triton interpreter)."""
    def ours(*args):
        with force_triton():
            return fn(*args)
    return ours


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``; donated buffers off, so that its backward can run alone on a retained
    graph (the ``backward`` mode), which donated buffers forbid."""
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    return torch.compile(fn)


def peer_providers(reference: Callable, ours: Callable, compile_: bool,
                   liger: Callable[[], Callable]) -> dict[str, Callable]:
    """The providers of an op that Liger-Kernel also has: ``torch`` (the eager reference), ``ours``,
    ``torch.compile`` of the reference (when ``compile_``) and ``liger()`` (when ``liger_kernel``
    is installed; ``liger`` imports it and returns the provider)."""
    found = {"torch": reference, "ours": ours}
    if compile_:
        found["torch.compile"] = compiled(reference)
    try:
        found["liger"] = liger()
    except ImportError:  # liger_kernel is not installed here: the comparison is left out
        pass
    return found


@dataclass
class PeerOp:
    """An op that eager torch, torch.compile, ours and Liger-Kernel all provide, as its benchmark
    defines it; `run_peer_op` measures it."""

    bench: str  # the JSON file's stem, e.g. "rms_norm"
    op: str  # the rows' op name
    reference: Callable  # eager torch: the "torch" provider, compiled for "torch.compile"
    ours: Callable  # our public op, run under force_triton
    liger: Callable[[], Callable]  # imports liger_kernel (ImportError when absent), returns its provider
    make_inputs: Callable[[Sequence[int], torch.dtype, str], Inputs]  # (shape, dtype, device)
    bytes_moved: Callable[[Sequence[int], torch.dtype], Mapping[str, int]] | None = None  # memory-bound ops


def run_peer_op(spec: PeerOp, args: argparse.Namespace, shapes: Sequence[Sequence[int]],
                extra: Mapping | None = None, notes: str = "") -> pathlib.Path | None:
    """Measure every provider of ``spec`` in every mode on each shape, print and write the result."""
    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    copy_bw = copy_bandwidth_gbps(device) if spec.bytes_moved else None
    providers = peer_providers(spec.reference, forced_triton(spec.ours), not args.no_compile, spec.liger)
    records = []
    for shape in shapes:
        records += measure_modes(spec.op, providers, lambda: spec.make_inputs(shape, dtype, device), shape, device,
                                 bytes_moved=spec.bytes_moved(shape, dtype) if spec.bytes_moved else None,
                                 copy_bw_gbps=copy_bw, extra={"dtype": dtype_name(dtype), **(extra or {})},
                                 quick=args.quick)
    return report(spec.bench, records, device, args, notes=notes, copy_bw_gbps=copy_bw)


def run_forward_op(bench: str, op: str, args: argparse.Namespace, shape_tables: tuple[Mapping, Mapping, Mapping],
                   case: Callable[[str, Sequence[int], torch.dtype, str], tuple[Mapping[str, Callable], int]],
                   label: str = "layer", notes: str = "") -> pathlib.Path | None:
    """Measure a memory-bound op with no backward (a dequantizer, a quantizer) on each named shape of
    ``shape_tables`` = (GPU, GPU with ``--quick``, CPU) tables (see `bench_shapes`).

    ``case(name, shape, dtype, device)`` makes the operand and returns the providers (name ->
    zero-argument callable) and the bytes the op must move; the shape's name goes in each row's
    ``label`` field. On a CPU the notes say that the Triton provider was not run (the interpreter
    would time Python).
    """
    device = bench_device()
    dtype = bench_dtype(args.dtype, device)
    copy_bw = copy_bandwidth_gbps(device)
    records = []
    for name, shape in bench_shapes(device, args.quick, *shape_tables).items():
        providers, moved = case(name, shape, dtype, device)
        records += measure_modes(op, providers, lambda: Inputs(args=()), shape, device, modes=("forward",),
                                 bytes_moved={"forward": moved}, copy_bw_gbps=copy_bw,
                                 extra={"dtype": dtype_name(dtype), label: name}, quick=args.quick)
        del providers  # the closures hold this shape's operand
    if not device.startswith("cuda"):
        notes = "; ".join(n for n in (notes, "ours (Triton) not run on a CPU") if n)
    return report(bench, records, device, args, notes=notes, copy_bw_gbps=copy_bw)


def bench_parser(doc: str, compile_provider: bool = False) -> argparse.ArgumentParser:
    """The options every kernel benchmark takes; add the bench's own to the returned parser."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="headline shapes only, shorter timing windows")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="folder for the JSON result")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    if compile_provider:
        parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    return parser


def bench_shapes(device: str, quick: bool, gpu, quick_gpu, cpu):
    """The shape list for this run: ``cpu`` on a CPU, else ``quick_gpu`` with ``--quick``, else ``gpu``."""
    return cpu if not device.startswith("cuda") else quick_gpu if quick else gpu


def bench_dtype(name: str | None, device: str) -> torch.dtype:
    """``DTYPES[name]``; by default bf16 on CUDA and fp32 on a CPU."""
    return DTYPES[name or ("bf16" if device.startswith("cuda") else "fp32")]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def report(bench_name: str, records: Sequence[Record], device: str, args: argparse.Namespace,
           notes: str = "", copy_bw_gbps: float | None = None) -> pathlib.Path | None:
    """Print the table, the notes and the checks against the issue's targets (bench.targets); unless
    ``--no-save``, write the JSON to ``args.out`` and return its path."""
    notes = "; ".join(n for n in (notes, "quick subset" if args.quick else "",
                                  "" if device.startswith("cuda") else CPU_NOTE) if n)
    if copy_bw_gbps:
        print(f"measured copy bandwidth: {copy_bw_gbps:.1f} GB/s")
    print(format_table(records))
    print(notes)
    headlines = check(bench_name, [r.to_json() for r in records])
    if headlines:
        print(format_headlines(headlines, meaningful=device.startswith("cuda")))
    if args.no_save:
        return None
    path = write_results(bench_name, records, device, notes=notes, copy_bw_gbps=copy_bw_gbps, results_dir=args.out,
                         targets=[h.to_json() for h in headlines])
    print("wrote", path)
    return path
