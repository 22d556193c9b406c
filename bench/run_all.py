"""Run every kernel benchmark and print one table of the headline figures against the targets.

    python -m bench.run_all                 # GPU: tests/kernels, then all shapes (about 8 minutes on an H100)
    python -m bench.run_all --quick         # headline shapes only, no torch.compile, no tests (about 2 minutes)
    python -m bench.run_all --out /tmp/b    # JSON elsewhere than bench/results/
    python -m bench.run_all --quick --tests --train --budget-s 470   # the lent-GPU run: < 8 minutes
    python -m bench.run_all --quick --tests --train --dry-run         # its plan and time limits only

Steps: on a GPU (unless ``--quick`` or ``--no-tests``) ``python -m pytest tests/kernels -q`` first,
its pass/fail recorded; then each ``bench.bench_<op>`` in its own process (a crash or an
out-of-memory of one does not end the others; each starts with an empty CUDA cache), writing its
JSON to ``--out``; then the checks of bench.targets over those files, printed and written to
``run_all-<device>-<date>.json`` beside them. A time budget (``--budget-s``) bounds the whole run:
each benchmark gets what is left minus a reserve for those after it, and one that runs out is
stopped and reported. With ``--train`` (default on a GPU) ``bench.bench_train --part gpu`` runs
last with a budget of its own (TRAIN_S, kept back from the steps before it, so that they cannot
starve it; on a CPU a two-layer SmolLM2-shaped model stands in, to check the code path).
``--dry-run`` prints the plan: each step and the most time it can get.

On a CPU the benchmarks run their small reference shapes, and the table says that the figures are
not meaningful (its verdicts read ``cpu``): that run only proves the scripts work. Do not commit
CPU results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys
import time

from bench.common import CPU_NOTE, RESULTS_DIR, bench_device, environment, write_results
from bench.targets import check, format_headlines

BENCHES = ("nf4", "lora", "dora", "lora_group", "lora_gather", "rms_norm", "rope", "swiglu", "linear_cross_entropy")
# Not in the default run (its 8-minute budget is spent above; bench_train's ours_fp8 / ours_bf16 jobs
# measure the FP8 step end to end): ``--only int8 fp8 fp8_rows lora_group_fp8``.
EXTRA_BENCHES = ("int8", "fp8", "fp8_rows", "lora_group_fp8")
# an entry that is another bench's module with arguments: its name -> (module stem, arguments)
VARIANTS = {"lora_group_fp8": ("lora_group", ["--fp8"])}
# the benches with a torch.compile provider: --quick passes them --no-compile (the others refuse it)
COMPILE_PROVIDER = ("rms_norm", "rope", "swiglu", "linear_cross_entropy")
REPO = pathlib.Path(__file__).resolve().parent.parent
RESERVE_S = 30  # kept back for each benchmark still to run, so that a slow one cannot starve them
QUICK_RESERVE_S = 20  # the same with --quick (headline shapes: about 20 s a benchmark on an H100)
TESTS_MAX_S = 180
TRAIN_S = 240  # bench_train --part gpu's budget (two shapes x four providers, bench.bench_train)
TRAIN_GRACE_S = 30  # a job it started just before its deadline may finish after it
TRAIN_CPU_ARGS = ["--device", "cpu", "--presets", "smollm2-135m", "--layers", "2", "--batch", "1", "--seq", "64",
                  "--warmup", "1", "--steps", "1"]


def default_budget_s(device: str, quick: bool) -> float:
    """8 minutes for a full GPU run (a device command may last 10), 2 for --quick; CPUs are slower."""
    if device.startswith("cuda"):
        return 120 if quick else 480
    return 600 if quick else 1800


def run_tests(timeout_s: float) -> dict:
    """``pytest tests/kernels -q`` in a subprocess: its exit code, last line and duration. With
    pytest-xdist installed (the GPU machine has it) 8 workers share the tests: most of their time on
    a GPU is compiling Triton kernels, which is CPU work."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(time.perf_counter() - start, 1), "summary": ""}
    lines = done.stdout.strip().splitlines() or [""]
    print("\n".join(lines[-15:]))
    return {"status": "passed" if done.returncode == 0 else "failed", "returncode": done.returncode,
            "seconds": round(time.perf_counter() - start, 1), "summary": lines[-1]}


def bench_args(name: str, out: pathlib.Path, quick: bool) -> tuple[str, list[str]]:
    """The module of benchmark ``name`` and its arguments: ``--out OUT [--quick [--no-compile]]``,
    after a `VARIANTS` entry's own."""
    stem, extra = VARIANTS.get(name, (name, []))
    args = [*extra, "--out", str(out)]
    if quick:
        args += ["--quick"] + (["--no-compile"] if name in COMPILE_PROVIDER else [])
    return f"bench.bench_{stem}", args


def run_bench(name: str, out: pathlib.Path, quick: bool, timeout_s: float) -> dict:
    """``python -m`` the module of `bench_args`; its status and the JSON file it wrote, ``<name>-*.json``."""
    start, begun = time.perf_counter(), time.time()
    module, args = bench_args(name, out, quick)
    cmd = [sys.executable, "-m", module, *args]
    print(f"\n=== {' '.join(cmd[1:])}  (at most {timeout_s:.0f} s)", flush=True)
    try:
        done = subprocess.run(cmd, cwd=REPO, timeout=timeout_s)
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
    except subprocess.TimeoutExpired:
        status = "timeout"
    written = [p for p in out.glob(f"{name}-*.json") if p.stat().st_mtime >= begun - 1]
    path = max(written, key=lambda p: p.stat().st_mtime) if written else None
    return {"bench": name, "status": status, "seconds": round(time.perf_counter() - start, 1),
            "file": str(path) if path else None}


def run_benches(names: list[str], out: pathlib.Path, quick: bool, deadline: float) -> list[dict]:
    """Each benchmark in turn, within what is left of the budget."""
    reserve = QUICK_RESERVE_S if quick else RESERVE_S
    runs = []
    for i, name in enumerate(names):
        left = deadline - time.perf_counter() - reserve * (len(names) - i - 1)
        if left < reserve:
            runs.append({"bench": name, "status": "skipped: out of time", "seconds": 0.0, "file": None})
            continue
        runs.append(run_bench(name, out, quick, left))
    return runs


def train_args(out: pathlib.Path, budget_s: float, gpu: bool) -> list[str]:
    """bench.bench_train's arguments: its GPU part within ``budget_s`` (on a CPU, a small stand-in model)."""
    return ["--part", "gpu", "--budget-s", f"{budget_s:.0f}", "--out", str(out)] + ([] if gpu else TRAIN_CPU_ARGS)


def run_train(out: pathlib.Path, budget_s: float, gpu: bool) -> dict:
    """``python -m bench.bench_train --part gpu --budget-s B --out OUT``; its status and JSON file."""
    start, begun = time.perf_counter(), time.time()
    cmd = [sys.executable, "-m", "bench.bench_train", *train_args(out, budget_s, gpu)]
    print(f"\n=== {' '.join(cmd[1:])}  (at most {budget_s + TRAIN_GRACE_S:.0f} s)", flush=True)
    try:
        done = subprocess.run(cmd, cwd=REPO, timeout=budget_s + TRAIN_GRACE_S)
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
    except subprocess.TimeoutExpired:
        status = "timeout"
    written = [p for p in out.glob("train_gpu_*.json") if p.stat().st_mtime >= begun - 1]
    return {"bench": "train", "status": status, "seconds": round(time.perf_counter() - start, 1),
            "file": str(written[0]) if written else None}


def plan(budget_s: float, benches: list[str], quick: bool, tests: bool, train: bool) -> list[tuple[str, float | None]]:
    """(step, the most seconds it can get) when every step before it runs to its own limit: the
    worst case of the budget logic in `main` (None: skipped, out of time)."""
    reserve = QUICK_RESERVE_S if quick else RESERVE_S
    train_s = TRAIN_S if train else 0
    left, steps = budget_s, []
    if tests:
        tests_s = min(TESTS_MAX_S, left - reserve * len(benches) - train_s)
        steps.append(("tests/kernels", tests_s if tests_s >= reserve else None))
        left -= max(tests_s, 0) if tests_s >= reserve else 0
    for i, name in enumerate(benches):
        limit = left - train_s - reserve * (len(benches) - i - 1)
        steps.append((f"bench_{name}", limit if limit >= reserve else None))
        left -= limit if limit >= reserve else 0
    if train:
        limit = min(TRAIN_S, left)
        steps.append(("bench_train --part gpu", limit + TRAIN_GRACE_S if limit >= 60 else None))
    return steps


def headlines_of(runs: list[dict]) -> list:
    """The bench.targets checks of every benchmark that wrote its JSON."""
    headlines = []
    for run in runs:
        rows = json.loads(pathlib.Path(run["file"]).read_text())["results"] if run["file"] else []
        headlines += check(run["bench"], rows)
    return headlines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="headline shapes, no torch.compile, no tests")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="folder for the JSON results")
    parser.add_argument("--tests", action=argparse.BooleanOptionalAction, default=None,
                        help="run pytest tests/kernels first (default: on a GPU, unless --quick)")
    parser.add_argument("--only", nargs="*", choices=BENCHES + EXTRA_BENCHES + ("train",),
                        help="these benchmarks only (train: bench_train --part gpu)")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=None,
                        help=f"bench_train --part gpu last, with {TRAIN_S} s of the budget (default: on a GPU)")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole run")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their time limits only")
    args = parser.parse_args(argv)

    device = bench_device()
    gpu = device.startswith("cuda")
    budget_s = args.budget_s or default_budget_s(device, args.quick)
    deadline = time.perf_counter() + budget_s
    want_tests = args.tests if args.tests is not None else (gpu and not args.quick)
    only = args.only or list(BENCHES) + ["train"]
    want_train = args.train if args.train is not None else ("train" in (args.only or []) or gpu)
    names = [name for name in only if name != "train"]
    if args.dry_run:
        print(f"budget {budget_s:.0f} s on {device}; each step's most time when those before it use all of theirs:")
        for step, limit in plan(budget_s, names, args.quick, want_tests, want_train):
            print(f"  {step:<28}" + ("skipped: out of time" if limit is None else f"at most {limit:.0f} s"))
        return 0
    train_s = TRAIN_S if want_train else 0
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    print(f"device {env['device_name']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}")
    if not gpu:
        print("No GPU: the benchmarks run small reference shapes; their figures are NOT meaningful.")

    tests = {"status": "not run"}
    reserve = QUICK_RESERVE_S if args.quick else RESERVE_S
    tests_s = min(TESTS_MAX_S, deadline - time.perf_counter() - reserve * len(names) - train_s)
    if want_tests:
        tests = run_tests(tests_s) if tests_s >= reserve else {"status": "skipped: out of time"}
    runs = run_benches(names, args.out, args.quick, deadline - train_s)
    if want_train:
        left = min(TRAIN_S, deadline - time.perf_counter())
        runs.append(run_train(args.out, left, gpu) if left >= 60 else
                    {"bench": "train", "status": "skipped: out of time", "seconds": 0.0, "file": None})
    headlines = headlines_of(runs)

    print("\n" + "\n".join(f"{r['bench']:<22}{r['status']:<22}{r['seconds']:>7.1f} s  {r['file'] or ''}" for r in runs))
    print(f"tests/kernels: {tests['status']} {tests.get('summary', '')}")
    print(format_headlines(headlines, meaningful=gpu))
    if not gpu:
        print("(CPU run: the verdicts read 'cpu'; the targets are defined on an H100/H200)")
    notes = "; ".join(n for n in ("quick subset" if args.quick else "", "" if gpu else CPU_NOTE) if n)
    path = write_results("run_all", [], device, notes=notes, results_dir=args.out,
                         targets=[h.to_json() for h in headlines], extra={"tests": tests, "runs": runs})
    print("wrote", path)
    failed = tests["status"] in ("failed", "timeout") or any(r["status"] != "ok" for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
