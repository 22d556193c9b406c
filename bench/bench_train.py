"""End-to-end benchmark: full LoRA / QLoRA training steps, ours against HF transformers + PEFT.

One step = forward + backward + gradient clipping (max norm 1) + AdamW, on one (B, T) batch of
token ids where every next token is a label. Both sides use the same model weights, shapes, batch,
LoRA (r = 16, alpha = 32, dropout 0.05, every linear of the decoder blocks), SDPA attention and
per-block gradient checkpointing (non-reentrant); AdamW with torch's defaults on the LoRA
parameters only:

* ``ours``: `models.load_model` (``quantize="nf4"`` for QLoRA) + `engine.adapters.inject_lora`, the step
  of `engine.recipes.sft` (`backward_window`: hidden states through the fused linear +
  cross-entropy, no (N, V) logits), in the model's dtype as the trainer runs it;
* ``hf_peft``: ``transformers.AutoModelForCausalLM`` (``attn_implementation="sdpa"``; for QLoRA
  ``BitsAndBytesConfig`` NF4 with double quantization and bf16 compute) + ``peft.get_peft_model``,
  ``model(input_ids, labels=...)``'s loss; on a GPU under ``torch.autocast(bfloat16)``, as the HF
  Trainer runs with ``bf16=True``. ``prepare_model_for_kbit_training`` is not called: it would cast
  norms and embeddings to fp32 and only cost HF memory.

Parts:

* ``cpu``: the SmolLM2-135M fixture (real weights), fp32, batch 4 x 256 tokens. The two providers'
  steps are interleaved round by round, so that a change in the machine's load hits both alike;
  absolute CPU times are not meaningful (shared cores), their ratio is. No peak memory on a CPU.
* ``gpu``: the ``llama2-7b`` shape with random weights (`tools.random_checkpoint`, written once as a
  bf16 folder both loaders read), batch 1 x 2048 tokens, LoRA on the bf16 base and QLoRA on NF4.
  Providers run one after the other; peak memory = the CUDA allocator's peak during the steps
  (weights + optimizer state + activations). Targets (issue 4): QLoRA >= 2.5x HF's tokens/s at
  <= 0.45x its peak memory.

Run from the repository root: ``python -m bench.bench_train [--part cpu|gpu] [--steps 5]``.
Results: ``bench/results/train_<part>_<UTC date>.json`` with the environment (bench.common).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, environment
from engine.adapters import LoRAConfig, inject_lora, set_trainable
from engine.data.batching import Batch
from engine.recipes.sft import backward_window
from models import load_model
from models.loading import save_model

RANK, ALPHA, DROPOUT, LR = 16, 32.0, 0.05, 1e-4


@dataclass(frozen=True)
class Case:
    """One configuration both providers run."""

    name: str          # e.g. "smollm2-135m/lora/cpu"
    model_dir: str
    device: str
    dtype: str         # "fp32" or "bf16"
    quant: str         # "none" or "nf4"
    batch: int
    seq: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]


def token_batch(vocab: int, case: Case, seed: int = 0) -> torch.Tensor:
    """(B, T) random token ids, the same for both providers."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (case.batch, case.seq), generator=g).to(case.device)


def lora_optimizer(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=LR)


# ----------------------------------------------------------------------------- providers

def build_ours(case: Case, ids: torch.Tensor) -> Callable[[], float]:
    """Our model + LoRA and a function running one step of the SFT recipe (returns the loss)."""
    model = load_model(case.model_dir, dtype=case.torch_dtype, device=case.device,
                       quantize=None if case.quant == "none" else case.quant)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=RANK, alpha=ALPHA, dropout=DROPOUT, target_modules="all-linear"))
    set_trainable(model)
    model.gradient_checkpointing = True
    model.train()
    params, optimizer = lora_optimizer(model)
    mask = torch.ones_like(ids)
    batch = Batch(input_ids=ids, labels=ids, attention_mask=mask,
                  position_ids=torch.arange(ids.shape[1], device=ids.device).expand_as(ids), segment_ids=None,
                  sample_ids=[[i] for i in range(ids.shape[0])], epoch=0, index=0)

    def step() -> float:
        loss, _ = backward_window(model, [batch], torch.device(case.device))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def build_hf(case: Case, ids: torch.Tensor) -> Callable[[], float]:
    """transformers + PEFT (+ bitsandbytes) on the same folder, and one HF-style step."""
    import peft
    import transformers

    kwargs = dict(dtype=case.torch_dtype, attn_implementation="sdpa")
    if case.quant == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if case.device != "cpu":
        kwargs["device_map"] = case.device
    model = transformers.AutoModelForCausalLM.from_pretrained(case.model_dir, **kwargs)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params, optimizer = lora_optimizer(model)
    mask = torch.ones_like(ids)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=case.device != "cpu")

    def step() -> float:
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


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


def summarize(case: Case, provider: str, times: list[float], losses: list[float], peak: int | None,
              resident: int | None) -> dict:
    median = statistics.median(times)
    return {"case": case.name, "provider": provider, "batch": case.batch, "seq": case.seq, "dtype": case.dtype,
            "quant": case.quant, "median_step_s": round(median, 4), "min_step_s": round(min(times), 4),
            "max_step_s": round(max(times), 4), "step_times_s": [round(t, 4) for t in times],
            "tokens_per_s": round(case.batch * case.seq / median, 2), "peak_mem_bytes": peak,
            "weights_resident_bytes": resident, "losses": [round(x, 5) for x in losses]}


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


def run_sequential(case: Case, vocab: int, warmup: int, steps: int) -> list[dict]:
    """GPU: one provider at a time, each with the allocator's peak over its steps."""
    ids = token_batch(vocab, case)
    rows = []
    for name, build in PROVIDERS.items():
        gc.collect()
        torch.cuda.empty_cache()
        step = build(case, ids)
        resident = torch.cuda.memory_allocated()
        for _ in range(warmup):
            timed(step, case.device)
        torch.cuda.reset_peak_memory_stats()
        runs = [timed(step, case.device) for _ in range(steps)]
        peak = torch.cuda.max_memory_allocated()
        rows.append(summarize(case, name, [t for t, _ in runs], [x for _, x in runs], peak, resident))
        print(f"  {case.name} {name}: {rows[-1]['tokens_per_s']:.0f} tok/s, peak {peak / 2**30:.2f} GiB", flush=True)
        del step
    gc.collect()
    torch.cuda.empty_cache()
    return rows


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


def gpu_cases(batch: int, seq: int, layers: int | None, workdir: Path) -> tuple[list[Case], int]:
    """Write the random llama2-7b folder once (bf16) and list the LoRA and QLoRA cases on it."""
    from tools.random_checkpoint import random_model

    folder = workdir / f"llama2-7b-random-{layers or 'all'}"
    if not (folder / "config.json").is_file():
        model = random_model("llama2-7b", torch.bfloat16, "cuda", num_layers=layers)
        save_model(model, folder)
        del model
        torch.cuda.empty_cache()
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    return [Case("llama2-7b/lora/bf16", str(folder), "cuda", "bf16", "none", batch, seq),
            Case("llama2-7b/qlora/nf4", str(folder), "cuda", "bf16", "nf4", batch, seq)], vocab


def versions() -> dict:
    found = {}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


CPU_NOTE = ("CPU: absolute times say little about training speed (a small shared CPU); the ratio is the "
            "figure, because both providers' steps were interleaved round by round on the same batch. "
            "Peak memory is not measured on a CPU.")
GPU_NOTE = "GPU: providers run one after the other; peak memory is the CUDA allocator's peak during the steps."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_train", description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (cpu 4, gpu 1)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (cpu 256, gpu 2048)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--steps", type=int, default=5, help="measured steps (the median is reported)")
    parser.add_argument("--layers", type=int, default=None, help="gpu: keep only the first N blocks (quick runs)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="gpu: where the random checkpoint goes")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.part == "cpu":
        cases, vocab = cpu_cases(args.batch or 4, args.seq or 256)
        rows = [r for case in cases for r in run_interleaved(case, vocab, args.warmup, args.steps)]
        device, note = "cpu", CPU_NOTE
    else:
        cases, vocab = gpu_cases(args.batch or 1, args.seq or 2048, args.layers, Path(args.workdir))
        rows = [r for case in cases for r in run_sequential(case, vocab, args.warmup, args.steps)]
        device, note = "cuda", GPU_NOTE
    result = {"bench": "train", "part": args.part, "environment": {**environment(device), **versions(),
                                                                     "torch_threads": torch.get_num_threads()},
              "notes": note, "lora": {"r": RANK, "alpha": ALPHA, "dropout": DROPOUT, "targets": "all-linear",
                                      "gradient_checkpointing": True, "attention": "sdpa"},
              "cases": [asdict(c) for c in cases], "ratios_ours_over_hf": ratios(rows), "results": rows}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    out = Path(args.results_dir) / f"train_{args.part}_{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios_ours_over_hf"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
