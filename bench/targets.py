"""The headline figures of the kernel benchmarks, checked against the targets of their issues.

Each check reduces a benchmark's result rows (``Record.to_json()`` dicts, as in its JSON file) to
one number, the worst case over the shapes and modes it covers, and compares it with its target:

* ``nf4``: ours' share of the measured copy bandwidth ≥ 0.85; bitsandbytes' time / ours ≥ 1.3.
* ``lora`` (rank 16, ``full`` mode): ours / base matmul ≤ 1.10; PEFT-style / ours ≥ 1.5.
* ``dora`` (``full`` layer mode and the model ``step``): dora / lora time ≤ 1.3.
* ``lora_group`` (rank 16, ``full``): q/k/v and gate/up as one grouped op / one op each ≤ 1.0
  (``lora_group_fp8``, over FP8 bases, the same).
* ``rms_norm``, ``rope``, ``swiglu``: ours' share of copy bandwidth ≥ 0.85 (every mode); Liger's
  time / ours ≥ 1 (no slower than Liger).
* ``linear_cross_entropy`` at 16,384 tokens and V = 128,256 (``full``): ours / eager peak memory
  ≤ 0.2 and time ≤ 1.05; Liger / ours time ≥ 1.
* ``train`` (`bench.bench_train --part gpu`, QLoRA, worst case over the model shapes): ours / HF+PEFT
  tokens/s ≥ 3, ours / Unsloth tokens/s ≥ 1.15, ours / HF+PEFT peak memory ≤ 0.6, ours' MFU ≥ 0.5.

A check whose providers were not run (ours on a CPU, bitsandbytes or Liger not installed, no
peak memory on a CPU) has no value and no verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LCE_TARGET_TOKENS, LCE_TARGET_VOCAB = 16_384, 128_256


@dataclass
class Headline:
    """One checked figure: ``value`` (the worst case, at ``where``) against ``op target``."""

    bench: str
    check: str
    op: str  # ">=" or "<="
    target: float
    value: float | None = None
    where: str = ""

    @property
    def ok(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def to_json(self) -> dict:
        return {"bench": self.bench, "check": self.check, "target": f"{self.op} {self.target}",
                "value": None if self.value is None else round(self.value, 4), "where": self.where, "ok": self.ok}


def _where(row: dict) -> str:
    return f"{tuple(row['shape'])} {row['mode']}"


def _worst(bench: str, check: str, op: str, target: float, points: list[tuple[float, str]]) -> Headline:
    """The headline of the worst point: the smallest for a ``>=`` target, the largest for ``<=``."""
    if not points:
        return Headline(bench, check, op, target)
    value, where = (min if op == ">=" else max)(points)
    return Headline(bench, check, op, target, value, where)


def ratios(rows: Sequence[dict], num: str, den: str, key: str = "median_ms",
           modes: Sequence[str] | None = None) -> list[tuple[float, str]]:
    """``num``'s ``key`` / ``den``'s, for every (shape, mode) both providers measured."""
    by_point = {(r["provider"], tuple(r["shape"]), r["mode"]): r for r in rows}
    points = []
    for (provider, shape, mode), row in by_point.items():
        other = by_point.get((den, shape, mode))
        if provider != num or other is None or (modes and mode not in modes):
            continue
        if row.get(key) and other.get(key):
            points.append((row[key] / other[key], _where(row)))
    return points


def copy_shares(rows: Sequence[dict], provider: str) -> list[tuple[float, str]]:
    """``provider``'s share of the measured copy bandwidth at every (shape, mode) it has one."""
    return [(r["share_of_copy_bw"], _where(r)) for r in rows
            if r["provider"] == provider and r.get("share_of_copy_bw") is not None]


def check(bench: str, rows: Sequence[dict]) -> list[Headline]:
    """The headlines of one benchmark's rows (an unknown ``bench`` has none). Where ours was not run
    (nf4 and lora on a CPU) the torch reference stands in for it, and the check's name says so."""
    ours = "ours" if any(r["provider"] == "ours" for r in rows) else "torch"
    if bench == "nf4":
        return [_worst(bench, f"{ours} share of copy bandwidth", ">=", 0.85, copy_shares(rows, ours)),
                _worst(bench, f"bitsandbytes time / {ours}", ">=", 1.3, ratios(rows, "bitsandbytes", ours))]
    if bench == "int8":
        return [_worst(bench, f"{ours} share of copy bandwidth", ">=", 0.85, copy_shares(rows, ours))]
    if bench == "fp8_rows":  # the kernel reads the operand twice (the second time mostly from L2)
        return [_worst(bench, f"{ours} share of copy bandwidth", ">=", 0.7, copy_shares(rows, ours))]
    if bench == "fp8":  # on a CPU both are reference paths: the check then says nothing of a GPU
        return [_worst(bench, "fp8 / bf16 LoRA layer time (full)", "<=", 0.7, ratios(rows, "fp8", "bf16",
                                                                                   modes=["full"]))]
    if bench == "lora":
        r16 = [r for r in rows if r.get("rank") == 16]
        return [_worst(bench, f"{ours} / base time, r=16", "<=", 1.10, ratios(r16, ours, "base", modes=["full"])),
                _worst(bench, f"peft / {ours} time, r=16", ">=", 1.5, ratios(r16, "peft", ours, modes=["full"]))]
    if bench == "dora":
        return [_worst(bench, "dora / lora time (layer full, model step)", "<=", 1.3,
                       ratios(rows, "dora", "lora", modes=["full", "step"]))]
    if bench in ("lora_group", "lora_group_fp8"):
        r16 = [r for r in rows if r.get("rank") == 16]
        return [_worst(bench, "grouped / separate time, r=16", "<=", 1.0,
                       ratios(r16, "grouped", "separate", modes=["full"]))]
    if bench in ("rms_norm", "rope", "swiglu"):
        return [_worst(bench, f"{ours} share of copy bandwidth", ">=", 0.85, copy_shares(rows, ours)),
                _worst(bench, f"liger time / {ours}", ">=", 1.0, ratios(rows, "liger", ours))]
    if bench == "linear_cross_entropy":
        at_target = [r for r in rows if r["shape"][0] == LCE_TARGET_TOKENS and r["shape"][2] == LCE_TARGET_VOCAB]
        rows_t = at_target or rows  # a CPU run has no target shape: its own shapes stand in
        return [_worst(bench, f"{ours} / eager peak memory", "<=", 0.2,
                       ratios(rows_t, ours, "torch", key="peak_mem_bytes", modes=["full"])),
                _worst(bench, f"{ours} / eager time", "<=", 1.05, ratios(rows_t, ours, "torch", modes=["full"])),
                _worst(bench, f"liger time / {ours}", ">=", 1.0, ratios(rows, "liger", ours, modes=["full"]))]
    if bench == "train":
        return train_checks(rows)
    return []


TRAIN_TARGETS = (  # (check, key of bench.train_report.case_ratios, op, target)
    ("ours / hf_peft tokens/s", "tokens_per_s_over_hf_peft", ">=", 3.0),
    ("ours / unsloth tokens/s", "tokens_per_s_over_unsloth", ">=", 1.15),
    ("ours / hf_peft peak memory", "peak_memory_over_hf_peft", "<=", 0.6),
    ("ours MFU", "mfu", ">=", 0.5),
    ("ours / ours_fsdp (1 rank) tokens/s", "tokens_per_s_over_ours_fsdp", "<=", 1.05),  # FSDP2's overhead
)


def train_checks(rows: Sequence[dict]) -> list[Headline]:
    """The training benchmark's headlines from its result rows (one per case and provider; a
    provider that failed or was skipped has no ``tokens_per_s``, and its checks no value)."""
    from bench.train_report import case_ratios  # imports torch: only when a train result is checked

    per_case = case_ratios(rows)
    return [_worst("train", name, op, target,
                   [(entry[key], case) for case, entry in per_case.items() if entry.get(key) is not None])
            for name, key, op, target in TRAIN_TARGETS]


def format_headlines(headlines: Sequence[Headline], meaningful: bool = True) -> str:
    """A table of the headlines; without ``meaningful`` (a CPU run) no verdict is given."""
    lines = [f"{'bench':<22}{'check':<34}{'target':>9}{'value':>9}  {'verdict':<8}worst at"]
    for h in headlines:
        value = "-" if h.value is None else f"{h.value:.3f}"
        verdict = "n/a" if h.ok is None else ("cpu" if not meaningful else "PASS" if h.ok else "FAIL")
        lines.append(f"{h.bench:<22}{h.check:<34}{h.op + ' ' + str(h.target):>9}{value:>9}  {verdict:<8}{h.where}")
    return "\n".join(lines)
