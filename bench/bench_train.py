"""End-to-end benchmark: full LoRA / QLoRA training steps, ours against transformers + PEFT and peers.

One step = forward + backward + gradient clipping (max norm 1) + AdamW on the LoRA parameters;
the providers and what each runs are described in `bench.train_providers` (r = 16, alpha = 32,
every linear of the decoder blocks, SDPA attention, non-reentrant per-block gradient checkpointing).

Parts:

* ``cpu``: the SmolLM2-135M fixture (real weights), fp32, batch 4 x 256 tokens of full rows, ours vs
  ``hf_peft``. The providers' steps are interleaved round by round, so that a change in the machine's
  load hits both alike; absolute CPU times are not meaningful (shared cores), their ratio is.
* ``mix``: the same fixture on real SFT samples (the length mix of examples/license_qa.jsonl),
  padded vs padding-free, ours vs ``hf_peft`` padded (`bench.train_mix`), interleaved likewise;
  tokens/s count real tokens only. ``--batch`` is the number of samples per step there (default 8).
* ``gpu``: QLoRA (NF4, bf16 compute) on the ``llama2-7b`` and ``llama3.1-8b`` shapes with random
  weights (`tools.random_checkpoint`, one bf16 folder per shape, written once, with a small
  tokenizer for the loaders that want one), batch 4 x 2048 tokens of full rows (no padding for
  any provider), providers ``ours``, ``hf_peft``, ``unsloth``, ``ours_fsdp`` (ours under FSDP2 on one
  rank, llama2-7b only), ``liger``, each in a process of its
  own, one after the other (a provider that cannot import or fails is recorded with its reason and
  the others go on; each starts with an empty GPU). Per provider: tokens/s, peak memory (the CUDA
  allocator's peak over the measured steps: weights + optimizer state + activations) and
  MFU = 6·N·tokens/s / the bf16 matmul peak measured at the start of the run (`bench.train_report`).
  Targets (checked in `bench.targets`): ours/HF tokens/s >= 3, ours/Unsloth >= 1.15, ours/HF peak
  memory <= 0.6, MFU >= 0.5, ours/ours_fsdp tokens/s <= 1.05. ``--budget-s`` bounds the part (default 300 s): a provider that would
  start with too little time left is skipped and says so; the jobs run in order of priority (ours and
  HF+PEFT on both shapes, then Unsloth, then Liger), so that a short budget cuts the references first.

Run from the repository root: ``python -m bench.bench_train [--part cpu|mix|gpu] [--steps 5]``
(``--dry-run`` lists the GPU part's jobs and their time limits). Results:
``bench/results/train_<part>_<UTC date>.json`` with the environment (bench.common).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, environment
from bench.targets import check, format_headlines
from bench.train_mix import mix_ratios, run_mix
from bench.train_providers import (
    ALPHA,
    DROPOUT,
    LLAMA_LINEARS,
    RANK,
    UNSLOTH_DROPOUT,
    Case,
    full_rows_batch,
    summarize,
    token_batch,
)
from bench.train_providers import build_hf as _build_hf
from bench.train_providers import build_ours as _build_ours
from bench.train_report import case_ratios, measure_matmul_flops, mfu, param_count
from models.loading import save_model

GPU_PRESETS = ("llama2-7b", "llama3.1-8b")
GPU_PROVIDERS = ("ours", "hf_peft", "unsloth", "ours_fsdp", "ours_fp8", "ours_bf16", "liger")  # in order of
# importance: the budget cuts the last. ours_<base>: ours with LoRA on another frozen base (fp8, bf16, int8)
# than the QLoRA cases' NF4, on the last shape (Llama-3.1-8B): fp8 + LoRA vs bf16 + LoRA vs NF4 QLoRA.
BASE_VARIANTS = {"ours_fp8": "fp8", "ours_bf16": "none", "ours_int8": "int8"}
WORKER_MAX_S = 150  # one provider on one shape: load, quantize, warm-up and steps
# Guesses for an H100/H200 (not yet measured): import + load + quantize + 5 steps of 4 x 2048 tokens.
JOB_ESTIMATE_S = {"ours": 25, "hf_peft": 40, "unsloth": 60, "liger": 40, "ours_fp8": 25, "ours_bf16": 25,
                  "ours_int8": 25}
WORKER_MIN_S = 25   # a job is not started with less than this left
FOLDER_S = 30       # writing one random bf16 folder (estimate, for the dry run)


def _fixed_step(built, ids: torch.Tensor) -> Callable[[], float]:
    prepared = built.prepare(full_rows_batch(ids))
    return lambda: float(built.step(prepared))


def build_ours(case: Case, ids: torch.Tensor) -> Callable[[], float]:
    """Our model + LoRA and a function running one step of the SFT recipe on ``ids`` (returns the loss)."""
    return _fixed_step(_build_ours(case), ids)


def build_hf(case: Case, ids: torch.Tensor) -> Callable[[], float]:
    """transformers + PEFT (+ bitsandbytes) on the same folder, and one HF-style step on ``ids``."""
    return _fixed_step(_build_hf(case), ids)


PROVIDERS = {"ours": build_ours, "hf_peft": build_hf}


# ----------------------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step: Callable[[], float], device: str) -> tuple[float, float]:
    """(seconds, loss) of one step."""
    _sync(device)
    start = time.perf_counter()
    loss = step()
    _sync(device)
    return time.perf_counter() - start, loss


def run_interleaved(case: Case, vocab: int, warmup: int, steps: int) -> list[dict]:
    """CPU: both providers in memory, one step each per round (load changes hit both alike)."""
    ids = token_batch(vocab, case)
    built = {name: build(case, ids) for name, build in PROVIDERS.items()}
    times = {name: [] for name in built}
    losses = {name: [] for name in built}
    for round_index in range(warmup + steps):
        for name, step in built.items():
            seconds, loss = timed(step, case.device)
            print(f"  {case.name} {name} step {round_index}: {seconds:.2f} s, loss {loss:.4f}", flush=True)
            if round_index >= warmup:
                times[name].append(seconds)
                losses[name].append(loss)
    return [summarize(case, name, times[name], losses[name], None, None) for name in built]


def ratios(rows: list[dict]) -> dict:
    """Per case: ours / HF tokens per second (> 1: ours faster) and peak memory (< 1: ours smaller)."""
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        ours = next(r for r in rows if r["case"] == case and r["provider"] == "ours")
        hf = next(r for r in rows if r["case"] == case and r["provider"] == "hf_peft")
        entry = {"speedup_tokens_per_s": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3)}
        if len(ours["step_times_s"]) == len(hf["step_times_s"]):
            # Interleaved rounds share the machine's load: HF time / our time, round by round.
            per_round = [h / o for h, o in zip(hf["step_times_s"], ours["step_times_s"])]
            entry["speedup_per_round"] = [round(x, 3) for x in per_round]
            entry["speedup_median_of_rounds"] = round(statistics.median(per_round), 3)
        if ours["peak_mem_bytes"] and hf["peak_mem_bytes"]:
            entry["peak_memory_ratio"] = round(ours["peak_mem_bytes"] / hf["peak_mem_bytes"], 3)
        out[case] = entry
    return out


# ----------------------------------------------------------------------------- parts

def cpu_cases(batch: int, seq: int) -> tuple[list[Case], int]:
    from tools.fixtures import smollm2_dir

    folder = str(smollm2_dir())
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    return [Case("smollm2-135m/lora/cpu/fp32", folder, "cpu", "fp32", "none", batch, seq)], vocab


def write_tokenizer(folder: Path, config: dict) -> None:
    """A small word-level tokenizer (unk, bos, eos, pad and a few words) in ``folder``, for loaders
    that insist on one (Unsloth); the benchmark feeds token ids, so its vocabulary does not matter
    beyond staying inside the model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = {"<unk>": 0, "<s>": config.get("bos_token_id") or 1, "</s>": 2, "<pad>": 3}
    vocab = {**specials, **{w: 4 + i for i, w in enumerate("the a of to and in is".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": config["max_position_embeddings"]}, indent=2))


def default_workdir(need_bytes: int) -> Path:
    """/dev/shm when it has room for the folders (RAM: written and read back fastest), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes * 1.2:
        return shm
    return Path(tempfile.gettempdir())


def random_folder(preset: str, layers: int | None, workdir: Path, device: str) -> Path:
    """The random bf16 folder of ``preset`` (written once, built on ``device``), with a tokenizer."""
    from tools.random_checkpoint import random_model

    folder = workdir / f"{preset}-random-{layers or 'all'}"
    if not (folder / "tokenizer_config.json").is_file():
        model = random_model(preset, torch.bfloat16, device, num_layers=layers)
        save_model(model, folder)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        write_tokenizer(folder, json.loads((folder / "config.json").read_text()))
    return folder


def case_name(preset: str, quant: str = "nf4") -> str:
    """``llama2-7b/qlora/nf4``, ``llama3.1-8b/lora/fp8``, ``llama3.1-8b/lora/bf16``."""
    return f"{preset}/qlora/nf4" if quant == "nf4" else f"{preset}/lora/{'bf16' if quant == 'none' else quant}"


def gpu_cases(batch: int, seq: int, layers: int | None, workdir: Path, presets=GPU_PRESETS,
              device: str = "cuda", quant: str = "nf4") -> tuple[list[Case], int]:
    """Write each preset's random folder once (bf16) and list its case on a ``quant`` base (QLoRA
    by default); returns (cases, the first one's vocabulary size)."""
    cases = []
    for preset in presets:
        folder = random_folder(preset, layers, workdir, device)
        dtype = "bf16" if device.startswith("cuda") else "fp32"
        cases.append(Case(case_name(preset, quant), str(folder), device, dtype, quant, batch, seq))
    return cases, json.loads((Path(cases[0].model_dir) / "config.json").read_text())["vocab_size"]


def run_isolated(case: Case, provider: str, warmup: int, steps: int, timeout_s: float) -> dict:
    """One provider on one case in a fresh process (`bench.train_providers` as a worker): its row,
    or the reason it has none (an error it reported, its exit code, a timeout)."""
    head = {"case": case.name, "provider": provider}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "bench.train_providers", "--provider", provider, "--case",
               json.dumps(asdict(case)), "--warmup", str(warmup), "--steps", str(steps), "--out", str(out)]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, timeout=timeout_s)
            row = json.loads(out.read_text()) if out.is_file() else {**head, "status": f"exit {done.returncode}"}
        except subprocess.TimeoutExpired:
            row = {**head, "status": f"timeout after {timeout_s:.0f} s"}
    return {**row, "wall_s": round(time.perf_counter() - start, 1)}


def gpu_jobs(presets, providers) -> list[tuple[str, str]]:
    """(shape, provider) in the order they run, which is their priority (a short budget cuts the
    last): ours and HF+PEFT on every shape, then Unsloth on every shape, then ours under FSDP2 on
    one rank (the first shape only: its overhead over ``ours``), then Liger (a reference)."""
    rank = {"ours": 0, "hf_peft": 0, "unsloth": 1, "ours_fsdp": 2, **dict.fromkeys(BASE_VARIANTS, 2), "liger": 3}
    jobs = [(preset, p) for preset in presets for p in providers
            if (p != "ours_fsdp" or preset == presets[0]) and (p not in BASE_VARIANTS or preset == presets[-1])]
    return sorted(jobs, key=lambda job: rank.get(job[1], 1))  # stable: shape order kept within a rank


def job_limit(left_s: float) -> float | None:
    """Seconds one job may take when ``left_s`` remain: at most WORKER_MAX_S; None (skip it, and
    say so) below WORKER_MIN_S."""
    limit = min(WORKER_MAX_S, left_s)
    return limit if limit >= WORKER_MIN_S else None


def run_gpu(args: argparse.Namespace, deadline: float) -> tuple[list[Case], list[dict], float]:
    """The GPU part: the measured matmul peak, then every (shape, provider) job within the budget."""
    device = args.device
    peak = measure_matmul_flops(device) if device.startswith("cuda") else measure_matmul_flops(device, 512, torch.float32)
    print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s", flush=True)
    jobs = gpu_jobs(args.presets, args.providers)
    cases: dict[str, Case] = {}
    rows = []
    for preset, provider in jobs:
        quant = BASE_VARIANTS.get(provider, "nf4")
        limit = job_limit(deadline - time.perf_counter())
        if limit is None:
            rows.append({"case": case_name(preset, quant), "provider": provider, "status": "skipped: out of time"})
            continue
        if (preset, quant) not in cases:  # a new shape's folder is written in its first job, then the limit retaken
            cases[preset, quant] = gpu_cases(args.batch or 4, args.seq or 2048, args.layers, args.workdir, [preset],
                                             device, quant)[0][0]
            limit = job_limit(deadline - time.perf_counter()) or WORKER_MIN_S
        case = cases[preset, quant]
        row = run_isolated(case, "ours" if provider in BASE_VARIANTS else provider, args.warmup, args.steps, limit)
        row["provider"] = provider
        if row.get("tokens_per_s"):
            n_params = param_count(json.loads((Path(case.model_dir) / "config.json").read_text()))
            ratio = mfu(n_params, row["tokens_per_s"], peak)
            row.update(n_params=n_params, mfu=round(ratio, 4) if ratio else None)
        rows.append(row)
    return list(cases.values()), rows, peak


def dry_run(args: argparse.Namespace) -> int:
    """Print the GPU part's jobs, each one's estimate and the limit it would get if the jobs before
    it took their estimates (`job_limit`), and the estimated total."""
    jobs = gpu_jobs(args.presets, args.providers)
    left, total, written = args.budget_s, 0.0, set()
    print(f"budget {args.budget_s:.0f} s; a random folder takes ~{FOLDER_S} s, in the first job of its shape")
    for preset, provider in jobs:
        folder = 0 if preset in written else FOLDER_S
        written.add(preset)
        limit = job_limit(left - folder)
        estimate = folder + JOB_ESTIMATE_S.get(provider, WORKER_MAX_S)
        print(f"  {preset:<14}{provider:<10}~{estimate:>4.0f} s  "
              + ("skipped: out of time" if limit is None else f"limit {limit:.0f} s"))
        if limit is not None:
            left, total = left - min(estimate, folder + limit), total + min(estimate, folder + limit)
    print(f"estimated total {total:.0f} s of {args.budget_s:.0f}")
    return 0


def versions() -> dict:
    found = {}
    for name in ("transformers", "peft", "bitsandbytes", "liger_kernel", "unsloth"):
        try:
            module = __import__(name) if name != "unsloth" else None  # importing unsloth patches transformers
            found[name] = module.__version__ if module else _dist_version(name)
        except Exception:  # noqa: BLE001  (a peer that cannot import is simply absent)
            found[name] = _dist_version(name)
    return found


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return None


CPU_NOTE = ("CPU: absolute times say little about training speed (a small shared CPU); the ratio is the "
            "figure, because the providers' steps were interleaved round by round on the same batch. "
            "Peak memory is not measured on a CPU.")
GPU_NOTE = ("GPU: QLoRA, full rows (no padding); each provider in its own process, one after the other; peak "
            "memory is the CUDA allocator's peak over the measured steps; MFU = 6·N·tokens/s / the measured "
            f"bf16 matmul peak. Unsloth runs with LoRA dropout {UNSLOTH_DROPOUT} (its fast path), the others "
            f"{DROPOUT}.")


def main(argv: list[str] | None = None) -> int:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("cpu", "mix", "gpu"), default="gpu" if gpu else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (cpu 4, gpu 4); mix: samples (8)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (cpu 256, gpu 2048)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (cpu, mix 5; gpu 3)")
    parser.add_argument("--layers", type=int, default=None, help="gpu: keep only the first N blocks (quick runs)")
    parser.add_argument("--presets", nargs="+", default=list(GPU_PRESETS), help="gpu: model shapes")
    parser.add_argument("--providers", nargs="+", default=list(GPU_PROVIDERS), help="gpu: providers, in order")
    parser.add_argument("--device", default="cuda" if gpu else "cpu", help="gpu part's device (cpu: a check of the code)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="gpu: wall-clock budget of the part")
    parser.add_argument("--dry-run", action="store_true", help="gpu: list the jobs and their time limits only")
    parser.add_argument("--workdir", type=Path, default=None, help="gpu: where the random checkpoints go")
    parser.add_argument("--results-dir", "--out", dest="results_dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.budget_s
    if args.part == "gpu" and args.dry_run:
        return dry_run(args)
    extra: dict = {}
    if args.part == "cpu":
        cases, vocab = cpu_cases(args.batch or 4, args.seq or 256)
        rows = [r for case in cases for r in run_interleaved(case, vocab, args.warmup, args.steps or 5)]
        device, note, extra["ratios_ours_over_hf"] = "cpu", CPU_NOTE, ratios(rows)
    elif args.part == "mix":
        fixture = cpu_cases(args.batch or 8, 0)[0][0]
        cases = [Case("smollm2-135m/lora/cpu/fp32/license_qa-mix", fixture.model_dir, "cpu", "fp32", "none",
                      args.batch or 8, 0)]
        pad_id = json.loads((Path(fixture.model_dir) / "config.json").read_text()).get("pad_token_id") or 2
        rows = run_mix(cases[0], args.batch or 8, args.warmup, args.steps or 5, pad_id)
        device, note, extra["ratios"] = "cpu", CPU_NOTE + " Real (non-pad) tokens only.", mix_ratios(rows)
    else:
        args.workdir = args.workdir or default_workdir(17 * 2**30 * len(args.presets))
        cases, rows, peak = run_gpu(argparse.Namespace(**{**vars(args), "steps": args.steps or 3}), deadline)
        device, note = args.device, GPU_NOTE
        targets = [h.to_json() for h in check("train", rows)]
        if not device.startswith("cuda"):  # a check of the code: its figures get no verdict
            targets = [{**t, "ok": None} for t in targets]
        extra.update(peak_bf16_matmul_flops=peak, ratios=case_ratios(rows), targets=targets)
    result = {"bench": "train", "part": args.part, "environment": {**environment(device), **versions(),
                                                                     "torch_threads": torch.get_num_threads()},
              "notes": note, "lora": {"r": RANK, "alpha": ALPHA, "dropout": DROPOUT, "targets": "all-linear",
                                      "modules": list(LLAMA_LINEARS), "gradient_checkpointing": True,
                                      "attention": "sdpa"},
              "cases": [asdict(c) for c in cases], **extra, "results": rows}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    out = Path(args.results_dir) / f"train_{args.part}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in extra.items() if k != "targets"}, indent=2))
    if args.part == "gpu":
        print(format_headlines(check("train", rows), meaningful=device.startswith("cuda")))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
