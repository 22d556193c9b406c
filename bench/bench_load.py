"""Loading benchmark: `models.load_model` against transformers' ``AutoModelForCausalLM.from_pretrained``.

Cases: the SmolLM2-135M fixture (real weights, fp32 on disk) in fp32 (no conversion), bf16 and NF4
(bf16 compute), and a random ``tinyllama-1.1b`` folder (`tools.random_checkpoint`, bf16 on disk,
one 2.2 GB file, written once under ``--workdir``) in bf16 and NF4. Providers:

* ``ours``: ``load_model(folder, dtype=..., device=..., quantize=None | "nf4")``, every check on
  (shapes, dtypes, finiteness of every tensor);
* ``transformers``: ``from_pretrained(folder, dtype=...)`` (plain load, same dtype; on a GPU
  with ``device_map="cuda"``);
  its NF4 (``BitsAndBytesConfig``, double quantization, bf16 compute) only where bitsandbytes runs,
  a CUDA GPU: elsewhere the row says ``unmeasured``.

Each (case, provider) runs in a fresh process, which imports its library (``import_s``) and then
loads ``--reps`` times: the first load pays what a process pays once (lazy imports, first-call
costs), the others are warm. The file is in the page cache for every load (``--rounds`` rounds,
interleaved provider by provider so that the machine's load hits both alike; a first unmeasured
read warms the cache). After each load, ``touch_s`` times one reduction over every parameter and
buffer: transformers maps a same-dtype CPU checkpoint lazily and reads nothing at load time, while
ours reads every byte for the finiteness check, so ``load + touch`` compares weights ready in memory.
Peak memory: the CUDA allocator's peak on a GPU; on a CPU the process's peak resident set (which
counts the page-cache pages of the mapped file once they are touched).

Ratios are ours / transformers (< 1: ours faster), per figure, the median over rounds.
Run from the repository root: ``python -m bench.bench_load [--quick] [--no-save]``; the JSON goes
to ``bench/results/load-<device name>-<UTC date>.json`` (`bench.common.write_results`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import RESULTS_DIR, bench_device, write_results

RANDOM_PRESET = "tinyllama-1.1b"
TRANSFORMERS_NF4_CPU = "unmeasured: bitsandbytes' NF4 needs a CUDA GPU"


@dataclass(frozen=True)
class Case:
    name: str  # e.g. "smollm2-135m/bf16"
    model_dir: str
    dtype: str  # "float32" / "bfloat16"
    quant: str  # "none" / "nf4"


# ----------------------------------------------------------------------------- one process, one provider

def _touch(model) -> None:
    """Read every byte of every parameter and buffer once (a sum per tensor)."""
    import torch

    for t in [*model.parameters(), *model.buffers()]:
        t.sum()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker(provider: str, case: Case, device: str, reps: int) -> dict:
    """Import the provider's library, then load ``reps`` times: seconds of each, peak memory."""
    start = time.perf_counter()
    import torch

    dtype = getattr(torch, case.dtype)
    if provider == "ours":
        from models.loading import load_model

        def load():
            return load_model(case.model_dir, dtype=dtype, device=device,
                              quantize=None if case.quant == "none" else case.quant)
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        # On a GPU transformers loads straight onto it (device_map); on a CPU its default is the CPU.
        placed = {"device_map": device} if device == "cuda" else {}
        if case.quant == "nf4":
            placed["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)

        def load():
            return AutoModelForCausalLM.from_pretrained(case.model_dir, dtype=dtype, **placed)
    import_s = time.perf_counter() - start
    loads, touches = [], []
    for _ in range(reps):
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = load()
        if device == "cuda":
            torch.cuda.synchronize()
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        _touch(model)
        touches.append(time.perf_counter() - start)
        del model
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"import_s": import_s, "load_s": loads, "touch_s": touches, "peak_mem_bytes": peak,
            "peak_mem_kind": "cuda allocator peak" if device == "cuda" else "process peak RSS"}


def run_worker(provider: str, case: Case, device: str, reps: int) -> dict:
    """`worker` in a fresh Python process (``--worker``); its JSON line."""
    spec = json.dumps({"provider": provider, "case": asdict(case), "device": device, "reps": reps})
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.bench_load", "--worker", spec], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{provider} {case.name}: worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- cases and rounds

def random_folder(workdir: Path) -> Path:
    """The random tinyllama-1.1b folder, bf16, written once (a ``.complete`` file marks it done)."""
    folder = workdir / f"{RANDOM_PRESET}-random-bf16"
    if not (folder / ".complete").is_file():
        import torch

        from models.loading import save_model
        from tools.random_checkpoint import random_model

        print(f"writing {folder} (once)", flush=True)
        save_model(random_model(RANDOM_PRESET, torch.bfloat16), folder)
        (folder / ".complete").write_text("1\n")
    return folder


def cases_for(models: list[str], quants: list[str], workdir: Path) -> list[Case]:
    from tools.fixtures import smollm2_dir

    cases = []
    if "smollm2-135m" in models:
        fixture = str(smollm2_dir())
        cases += [Case("smollm2-135m/fp32", fixture, "float32", "none"),
                  Case("smollm2-135m/bf16", fixture, "bfloat16", "none"),
                  Case("smollm2-135m/nf4", fixture, "bfloat16", "nf4")]
    if RANDOM_PRESET in models:
        folder = str(random_folder(workdir))
        cases += [Case(f"{RANDOM_PRESET}/bf16", folder, "bfloat16", "none"),
                  Case(f"{RANDOM_PRESET}/nf4", folder, "bfloat16", "nf4")]
    return [c for c in cases if c.quant in quants]


def transformers_nf4_runs(device: str) -> bool:
    import importlib.util

    return device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None


def summarize(case: Case, provider: str, runs: list[dict]) -> dict:
    """One row: per round, the first load (fresh process), the median warm load, and load + touch."""
    first = [r["load_s"][0] for r in runs]
    warm = [statistics.median(r["load_s"][1:]) for r in runs if len(r["load_s"]) > 1]
    ready = [statistics.median([ld + t for ld, t in zip(r["load_s"][1:], r["touch_s"][1:])]) for r in runs
             if len(r["load_s"]) > 1]
    return {"case": case.name, "provider": provider, "dtype": case.dtype, "quant": case.quant,
            "first_load_s": [round(x, 3) for x in first], "warm_load_s": [round(x, 3) for x in warm],
            "warm_load_plus_touch_s": [round(x, 3) for x in ready],
            "import_s": [round(r["import_s"], 3) for r in runs],
            "peak_mem_bytes": max(r["peak_mem_bytes"] for r in runs), "peak_mem_kind": runs[0]["peak_mem_kind"]}


FIGURES = ("first_load_s", "warm_load_s", "warm_load_plus_touch_s")


def ratios(rows: list[dict]) -> dict:
    """Per case and figure: ours / transformers, round by round, and their median."""
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        ours = next((r for r in rows if r["case"] == case and r["provider"] == "ours"), None)
        hf = next((r for r in rows if r["case"] == case and r["provider"] == "transformers"), None)
        if ours is None or hf is None or "status" in hf:
            out[case] = hf["status"] if hf and "status" in hf else "unmeasured"
            continue
        out[case] = {fig: round(statistics.median(o / h for o, h in zip(ours[fig], hf[fig])), 3)
                     for fig in FIGURES if ours[fig] and hf[fig]}
        out[case]["peak_mem"] = round(ours["peak_mem_bytes"] / hf["peak_mem_bytes"], 3)
    return out


def run(cases: list[Case], device: str, rounds: int, reps: int) -> list[dict]:
    rows = []
    for case in cases:
        for f in Path(case.model_dir).glob("*.safetensors"):  # the page cache holds the file for every provider
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        providers = ["ours", "transformers"] if case.quant == "none" or transformers_nf4_runs(device) else ["ours"]
        runs: dict[str, list[dict]] = {p: [] for p in providers}
        for _ in range(rounds):
            for p in providers:
                runs[p].append(run_worker(p, case, device, reps))
        for p in providers:
            rows.append(summarize(case, p, runs[p]))
            print(f"{case.name:<22}{p:<14}first {statistics.median(rows[-1]['first_load_s']):7.3f} s   warm "
                  f"{statistics.median(rows[-1]['warm_load_s']):7.3f} s   +touch "
                  f"{statistics.median(rows[-1]['warm_load_plus_touch_s']):7.3f} s   peak "
                  f"{rows[-1]['peak_mem_bytes'] / 2**30:.2f} GiB", flush=True)
        if "transformers" not in providers:
            rows.append({"case": case.name, "provider": "transformers", "dtype": case.dtype, "quant": case.quant,
                         "status": TRANSFORMERS_NF4_CPU if device != "cuda" else "unmeasured: bitsandbytes missing"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_load", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", RANDOM_PRESET],
                        choices=["smollm2-135m", RANDOM_PRESET])
    parser.add_argument("--quant", nargs="+", default=["none", "nf4"], choices=["none", "nf4"],
                        help="the dense cases (none), the NF4 ones, or both")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per (case, provider)")
    parser.add_argument("--reps", type=int, default=3, help="loads per process (the first is the fresh one)")
    parser.add_argument("--quick", action="store_true", help="the fixture only, 1 round")
    parser.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "lora-engine" / "bench",
                        help="where the random tinyllama folder is written once")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON result")
    parser.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["provider"], Case(**spec["case"]), spec["device"], spec["reps"])))
        return 0
    if args.reps < 2 or args.rounds < 1:
        parser.error("--reps must be at least 2 (one fresh load, one warm) and --rounds at least 1")
    device = bench_device()
    models, rounds = (["smollm2-135m"], 1) if args.quick else (args.models, args.rounds)
    rows = run(cases_for(models, args.quant, args.workdir), device, rounds, args.reps)
    result_ratios = ratios(rows)
    print(json.dumps(result_ratios, indent=2))
    if args.no_save:
        return 0
    notes = (f"ratios are ours / transformers; {rounds} rounds x {args.reps} loads per process; "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    path = write_results("load", [], device, notes=notes, results_dir=args.out,
                         extra={"results": rows, "ratios_ours_over_transformers": result_ratios,
                                "versions": _versions()})
    print("wrote", path)
    return 0


def _versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("transformers", "safetensors", "bitsandbytes"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    raise SystemExit(main())
