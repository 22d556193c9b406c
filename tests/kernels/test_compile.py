"""Every Triton kernel compiles for sm_80 and sm_90, within shared memory and without a register
spill, in every configuration its launcher can pick — checked on a CPU, with no GPU and no driver.

What is compiled. Each kernel file ends its launchers with ``compile_cases(shapes)`` (the format
is in `kernels/launch_cases.py`): one case per specialisation its launchers can pass — dtype,
constexpr flags (DROPOUT, HAS_BIAS, COMPUTE_DW, ...), block sizes from the launchers' own helpers,
stride patterns — each with every configuration it can run with: an autotuned launch lists its
autotuner's ``.configs``, a plain launch its one ``num_warps``. Shapes are Llama-2-7B's
(`kernels.launch_cases.LLAMA2_7B`: hidden 4096, intermediate 11008, vocab 32000, head_dim 128,
32 heads, 4096 tokens), dtypes bf16, fp16 and fp32. Each (case, config, target) is compiled once
by ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``,
the signature and the divisibility attributes built by Triton's own ``native_specialize_impl``
from the sample argument values, as the runtime does at launch (ints equal to 1 become
constexprs, multiples of 16 and tensors get ``tt.divisibility=16``).

What fails. A compile error; ``metadata.shared`` above the architecture's opt-in limit (sm_80:
166,912 bytes = 163 KB, sm_90: 232,448 bytes = 227 KB); any spill store or load reported by
ptxas. ``CompiledKernel.n_spills``/``n_regs`` are filled only when a driver loads the binary, so
the check reads ptxas' own ``-v`` report instead (Triton always runs ptxas with ``-v``;
``TRITON_DUMP_PTXAS_LOG=1`` prints that log, captured here; a fresh ``TRITON_CACHE_DIR`` and
``TRITON_ALWAYS_COMPILE=1`` make sure ptxas really runs). None of the autotuners prunes configs
(``prune_configs_by``), so a config over the shared-memory limit would be tried on a GPU and is a
failure; a launcher that prunes must list in its case only the configs its pruner keeps.

Keeping in sync. The check fails when a ``*_kernel`` of a kernel file is in no case, when a case
does not name exactly the kernel's arguments, or when an autotuned case does not list exactly its
autotuner's configs. The LoRA ops' low-rank kernels live in ``kernels/lowrank.py``, whose
``compile_cases`` lists the launches of both `kernels.lora` and `kernels.lora_group`.

Why a subprocess. tests/conftest.py sets ``TRITON_INTERPRET=1`` before Triton is imported, which
turns every ``@triton.jit`` into an interpreter object that cannot be compiled (and flips
interpreter-only switches in the kernels); the check runs as
``python -m tests.kernels.test_compile --out report.json`` without it, which also works by hand.

Reductions in CI (to stay within minutes on 2 cores; ``--full`` lifts all three):

* the LoRA tiles (``LORA_KERNELS``) skip fp16, which has bf16's element size, tiling, MMA shapes
  and shared-memory layout;
* they are compiled at rank 16 only (BLOCK_R 16, the default rank), not 8 / 32 / 64, and fp32
  in torch's default ``ieee`` dot precision only (``tf32`` is reachable with allow_tf32);
* a kernel that already failed ``STOP_AFTER`` compiles on a target is not compiled further there
  (its remaining configs are reported as not checked): a spilling tile makes ptxas slow (30-40 s
  a compile), and one failure already fails the test.

Every config of every autotuner is still compiled for both targets.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# the kernel files that define Triton kernels, ``@triton.jit def *_kernel(`` (nf4_linear.py has none: it
# calls nf4's dequantizer; lora.py and lora_group.py neither: they launch those of lowrank.py; rounding.py
# holds a helper the kernels inline, compiled with each of them)
KERNEL_MODULES = sorted(p.stem for p in (ROOT / "kernels").glob("*.py")
                        if re.search(r"^@triton\.jit(\(.*\))?\s*\ndef \w+_kernel\(", p.read_text(), re.M))
SHARED_LIMIT = {80: 166_912, 90: 232_448}  # bytes of shared memory per block, opt-in maximum
# the LoRA tiles: reduced in CI (module docstring)
LORA_KERNELS = {"_lowrank_down_kernel", "_lowrank_up_kernel", "_lowrank_wgrad_kernel"}
CI_LORA_RANKS = (16,)
STOP_AFTER = 3
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


# ---------------------------------------------------------------------------------------------
# The check (runs without TRITON_INTERPRET, see the module docstring)
# ---------------------------------------------------------------------------------------------


def specialise(fn, values: dict, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compile``, as the runtime derives them from
    the arguments of a launch; ``values`` holds every parameter of ``fn``."""
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.runtime.jit import MockTensor

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        arg = MockTensor(value) if isinstance(value, torch.dtype) else value  # data_ptr 0: aligned
        ty, key = native_specialize_impl(backend, arg, param.is_const, not param.do_not_specialize,
                                         not param.do_not_specialize_on_alignment)
        if ty == "constexpr":  # an int equal to 1
            signature[param.name], constexprs[(i,)] = "constexpr", key
            continue
        signature[param.name] = ty
        if key:
            attrs[(i,)] = backend.parse_attr(key)
    return signature, constexprs, attrs


def ptxas_report(log: str) -> dict:
    """Registers and spill bytes from ptxas' ``-v`` log (one entry function per compile)."""
    spills, regs = _SPILLS.findall(log), _REGS.findall(log)
    if not spills or not regs:
        raise RuntimeError(f"no ptxas -v report in the captured log:\n{log[-2000:]}")
    return {"regs": max(map(int, regs)), "spill_stores": sum(int(s) for s, _ in spills),
            "spill_loads": sum(int(lo) for _, lo in spills)}


def specialisation_key(case, config, cc: int) -> str:
    """What makes a binary: kernel, signature, constexprs, attributes, options, target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    values = {**case.args, **case.constexprs, **config.kwargs}
    spec = specialise(case.fn, values, make_backend(GPUTarget("cuda", cc, 32)))
    return repr((case.fn.__name__, spec, config.num_warps, config.num_stages, sorted(case.options.items()), cc))


def compile_one(case, config, cc: int) -> dict:
    """Compile one (case, config) for sm_``cc``; returns its record (``problem`` None when fine)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", cc, 32)
    record = {"kernel": case.fn.__name__, "case": f"{str(case.dtype).removeprefix('torch.')} {case.name}",
              "config": ", ".join([f"{k}={v}" for k, v in config.kwargs.items()]
                                  + [f"num_warps={config.num_warps}", f"num_stages={config.num_stages}"]),
              "cc": cc, "problem": None}
    signature, constexprs, attrs = specialise(case.fn, {**case.args, **case.constexprs, **config.kwargs},
                                              make_backend(target))
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, **case.options}
    start, log = time.perf_counter(), io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(triton.compiler.ASTSource(fn=case.fn, signature=signature, constexprs=constexprs,
                                                              attrs=attrs), target=target, options=options)
        record.update(ptxas_report(log.getvalue()), shared=kernel.metadata.shared)
    except Exception as err:  # noqa: BLE001 -- every compile error is a finding, reported with its case
        record["problem"] = f"compile error: {type(err).__name__}: {str(err)[-1500:]}"
    record["seconds"] = round(time.perf_counter() - start, 2)
    if record["problem"] is None:
        if record["shared"] > SHARED_LIMIT[cc]:
            record["problem"] = f"shared memory {record['shared']} B > {SHARED_LIMIT[cc]} B"
        elif record["spill_stores"] or record["spill_loads"]:
            record["problem"] = f"register spills: {record['spill_stores']} B stores, {record['spill_loads']} B loads"
    return record


def sync_problems(module, cases) -> list[str]:
    """What makes ``cases`` disagree with ``module``'s kernels, launch arguments or autotuners."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    problems = []
    for case in cases:
        given = [*case.args, *case.constexprs]
        for config in case.configs:
            names = given + list(config.kwargs)
            if sorted(names) != sorted(case.fn.arg_names):
                missing, extra = set(case.fn.arg_names) - set(names), set(names) - set(case.fn.arg_names)
                problems.append(f"{case.fn.__name__} '{case.name}': missing {sorted(missing)}, unknown {sorted(extra)}"
                                + (", given twice" if len(names) != len(set(names)) else ""))
                break
    covered = {id(case.fn) for case in cases}
    autotuners = []  # module globals, and the values of dicts of them (one per specialisation)
    for name, obj in vars(module).items():
        if isinstance(obj, JITFunction) and name.endswith("_kernel") and id(obj) not in covered:
            problems.append(f"{name} is in no case of {module.__name__}.compile_cases")
        if isinstance(obj, Autotuner):
            autotuners.append((name, obj))
        if isinstance(obj, dict):
            autotuners += [(f"{name}[{key}]", v) for key, v in obj.items() if isinstance(v, Autotuner)]
    for name, obj in autotuners:
        if not any(case.fn is obj.fn and _same_configs(case, obj) for case in cases):
            problems.append(f"autotuned {name} ({obj.fn.__name__}): no case lists its configs")
    for case in cases:
        tuners = [obj for _, obj in autotuners if obj.fn is case.fn]
        if tuners and not any(_same_configs(case, obj) for obj in tuners):
            problems.append(f"{case.fn.__name__} '{case.name}': configs are not those of any of its autotuners")
    return problems


def _same_configs(case, tuner) -> bool:
    """A case lists exactly an autotuner's configs (a subset, for one that prunes)."""
    if tuner.early_config_prune is not None or tuner.perf_model is not None:
        return {id(c) for c in case.configs} <= {id(c) for c in tuner.configs}
    return [id(c) for c in case.configs] == [id(c) for c in tuner.configs]


def _in_ci(case) -> bool:
    """Whether a case is compiled without ``--full`` (the reductions of the module docstring)."""
    import torch

    if case.fn.__name__ not in LORA_KERNELS:
        return True
    if case.dtype == torch.float16:
        return False
    return case.dtype != torch.float32 or "tf32" not in case.name.split()


def run_check(modules: list[str], ccs: list[int], full: bool = False) -> dict:
    """Compile every case of every module for every target; the report as a dict."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"
    from dataclasses import replace

    from kernels.launch_cases import LLAMA2_7B

    records, problems = [], []
    start, cpu_start = time.perf_counter(), os.times()
    for stem in modules:
        module = importlib.import_module(f"kernels.{stem}")
        cases = module.compile_cases(LLAMA2_7B)
        problems += [f"{stem}: {p}" for p in sync_problems(module, cases)]
        if not full:
            ci_shapes = replace(LLAMA2_7B, lora_ranks=CI_LORA_RANKS)
            cases = [c for c in module.compile_cases(ci_shapes) if _in_ci(c)]
        seen, failures = set(), {}
        for case in cases:
            for config in case.configs:
                for cc in ccs:
                    key = specialisation_key(case, config, cc)
                    if key in seen:  # e.g. dA and dB: the same binary at other sizes
                        continue
                    seen.add(key)
                    if not full and failures.get((case.fn, cc), 0) >= STOP_AFTER:
                        records.append({"module": stem, "kernel": case.fn.__name__, "case": case.name, "cc": cc,
                                        "config": str(config), "seconds": 0.0,
                                        "problem": f"not checked: {STOP_AFTER} compiles of this kernel failed"})
                        continue
                    records.append({"module": stem, **compile_one(case, config, cc)})
                    failures[(case.fn, cc)] = failures.get((case.fn, cc), 0) + (records[-1]["problem"] is not None)
    cpu = os.times()
    cpu_seconds = sum(getattr(cpu, f) - getattr(cpu_start, f) for f in ("user", "system", "children_user",
                                                                         "children_system"))
    import triton
    return {"triton": triton.__version__, "wall_seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(cpu_seconds, 1), "sync_problems": problems, "records": records}


def summary(report: dict) -> str:
    """One line per (kernel, target): compiles, max shared memory, max registers, seconds."""
    rows = {}
    for r in report["records"]:
        row = rows.setdefault((r["module"], r["kernel"], r["cc"]), {"n": 0, "shared": 0, "regs": 0, "s": 0.0, "bad": 0})
        row["n"] += 1
        row["s"] += r["seconds"]
        row["bad"] += r["problem"] is not None
        row["shared"] = max(row["shared"], r.get("shared", 0))
        row["regs"] = max(row["regs"], r.get("regs", 0))
    lines = [f"triton {report['triton']}: {len(report['records'])} compiles, {report['wall_seconds']} s wall, "
             f"{report['cpu_seconds']} s CPU (with ptxas)"]
    lines += [f"  sm_{cc} {kernel:<24} {row['n']:>4} compiles  max shared {row['shared']:>6} B  max regs "
              f"{row['regs']:>3}  {row['s']:6.1f} s  {row['bad']} failing" for (_, kernel, cc), row in sorted(rows.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile every launchable Triton kernel config for sm_80/sm_90.")
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    parser.add_argument("--modules", nargs="*", default=KERNEL_MODULES, help="kernel files (stems) to check")
    parser.add_argument("--cc", nargs="*", type=int, default=sorted(SHARED_LIMIT), help="compute capabilities")
    parser.add_argument("--full", action="store_true", help="no CI reductions (all ranks, fp16, tf32; no early stop)")
    args = parser.parse_args(argv)
    report = run_check(args.modules, args.cc, args.full)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(summary(report), file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The test: one subprocess for the whole matrix, one test per (kernel file, target)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory) -> dict:
    """The report of both targets, compiled by two subprocesses at once (ptxas is single-threaded:
    on CI's two cores the two targets take the time of one)."""
    tmp = tmp_path_factory.mktemp("compile")
    runs = []
    for cc in sorted(SHARED_LIMIT):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=str(tmp / f"cache{cc}"), TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1",
                   OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        out = tmp / f"report{cc}.json"
        cmd = [sys.executable, "-m", "tests.kernels.test_compile", "--out", str(out), "--cc", str(cc)]
        runs.append((out, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)))
    reports = []
    for out, process in runs:
        _, stderr = process.communicate(timeout=1200)
        assert process.returncode == 0, f"the compile check crashed:\n{stderr[-4000:]}"
        reports.append(json.loads(out.read_text()))
    report = {**reports[0], "records": [r for rep in reports for r in rep["records"]],
              "sync_problems": sorted({p for rep in reports for p in rep["sync_problems"]}),
              "wall_seconds": max(rep["wall_seconds"] for rep in reports),
              "cpu_seconds": sum(rep["cpu_seconds"] for rep in reports)}
    print(summary(report))
    return report


def test_cases_are_in_sync_with_the_kernels(compile_report):
    assert not compile_report["sync_problems"], "\n".join(compile_report["sync_problems"])


@pytest.mark.parametrize("cc", sorted(SHARED_LIMIT))
@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_every_launchable_config_compiles_within_limits(compile_report, module, cc):
    mine = [r for r in compile_report["records"] if r["module"] == module and r["cc"] == cc]
    assert mine, f"no compiled case for kernels/{module}.py on sm_{cc}"
    bad = [f"{r['kernel']} [{r['case']}] [{r['config']}]: {r['problem']}" for r in mine if r["problem"]]
    assert not bad, f"{len(bad)} of {len(mine)} compiles fail on sm_{cc}:\n" + "\n".join(bad)


if __name__ == "__main__":
    main()
