"""What a plain ``engine.merge`` of one adapter will do, decided before any weight is read.

* Whether the adapter is QLoRA (trained on an NF4-rounded base) — or, the same for merging, on an
  int8 or FP8 base (``fmt``; everything below holds with that format's rounding in place of NF4's):
  ``--quant nf4|int8|fp8`` says so, or the run that trained it recorded ``quant: ...`` (the run
  folder's ``config.json``: the adapter at ``OUTPUT/adapter`` or
  ``OUTPUT/checkpoints/step-N/adapter``), or the base folder is a bitsandbytes 4-bit (or 8-bit:
  int8) checkpoint (then the base's 16-bit weights do not exist). ``--requantize nf4`` applies to NF4 adapters only.
* ``--onto`` for a QLoRA adapter, W' = W_onto + s·B·A with

      quantized:  W_onto = dequant(NF4(W))   the weights the adapter was trained against
      original:   W_onto = W                 the 16-bit base, which adds W − dequant(NF4(W))

  The model as trained is dequant(NF4(W)) + s·B·A, so ``quantized`` leaves only the rounding of W'
  to the stored dtype, while ``original`` adds the whole NF4 quantization error E = W − dequant(NF4(W))
  of every adapted layer. The default is the one that drifts less from the model as trained in
  our measurement (bench/merge_drift.py, README), the issue's first proposal (``original``) only
  where it measured lower:

  - a dense merge: ``quantized`` (KL 7e-5 against 0.16 nats/token on the SmolLM2 fixture);
  - with ``--requantize nf4``: ``original`` (KL 0.05 against 1.4). Requantizing
    dequant(NF4(W)) + s·B·A puts every weight back on its own NF4 grid point unless the update
    moves it half a step, which a LoRA update rarely does: NF4 rounds most of the adapter away.
    NF4(W + s·B·A) rounds E + s·B·A instead, and the residual E of the original weights acts as
    a dither: the codes that flip carry the update on average (error variance ≈ |s·B·A|·step
    rather than step²/12).

  A bitsandbytes 4-bit base allows only ``quantized``. ``--onto`` and ``--requantize`` for a plain
  LoRA adapter are refused (exit 2): there is one base to merge onto.
* Where the drift is measured: ``--drift-data``, else (QLoRA) the training data file the adapter's
  metadata records (`engine.run.folder.lineage`) or its run's config.json names, if it still
  exists (measured even if its sha256 is not the recorded one, and then said so); else the drift is left unmeasured, and says how to measure it. A plain LoRA merge is
  measured only when ``--drift-data`` is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.adapters import read_adapter_metadata
from engine.data.samples import Sample, load_samples
from engine.errors import InputError
from engine.run.folder import file_sha256, is_run_folder
from models.bnb_checkpoint import bnb_checkpoint_format
from models.quantized import FORMATS
from models.tokenizer import load_tokenizer

ONTO = ("original", "quantized")
DEFAULT_ONTO = {"none": "quantized", "nf4": "original"}  # by --requantize: the lower drift (docstring)
REQUANTIZE = ("none", "nf4")
QUANTIZED = tuple(FORMATS)  # the frozen-base formats an adapter may be trained on (models.quantized)


@dataclass(frozen=True)
class TrainingRecord:
    """What the run that trained an adapter recorded (any field may be unknown: None)."""

    quant: str | None
    data: Path | None                 # the training data file, if it still exists
    data_changed: bool = False        # its sha256 is not the one the adapter's lineage recorded
    format: str = "auto"
    train_on_prompt: bool = False
    run_config: Path | None = None    # where quant / format came from


def _run_config(adapter: Path) -> dict[str, Any] | None:
    """The TrainConfig (config.json) of the run folder holding ``adapter``, if any."""
    for folder in (adapter.parent, adapter.parent.parent.parent):  # OUTPUT/adapter, OUTPUT/checkpoints/step-N/adapter
        if is_run_folder(folder):
            try:
                cfg = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError):
                return None
            return {**cfg, "_path": str(folder / "config.json")} if isinstance(cfg, dict) else None
    return None


def training_record(adapter: str | Path) -> TrainingRecord:
    """The run record of ``adapter``: its run folder's config.json and its lineage metadata."""
    adapter = Path(adapter).resolve()
    cfg = _run_config(adapter) or {}
    candidates: list[tuple[Path, str | None]] = []  # (file, sha256 recorded when the run started)
    metadata = read_adapter_metadata(adapter) or {}
    data = metadata.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict) and isinstance(data[0].get("path"), str):
        candidates.append((Path(data[0]["path"]), data[0].get("sha256")))  # the lineage record: absolute
    if isinstance(cfg.get("data"), str):
        candidates.append((Path(cfg["data"]), None))
    found = next(((p, sha) for p, sha in candidates if p.is_file()), None)
    changed = found is not None and found[1] is not None and file_sha256(found[0]) != found[1]
    return TrainingRecord(quant=cfg.get("quant"), data=found[0] if found else None, data_changed=changed,
                          format=cfg.get("format", "auto"), train_on_prompt=bool(cfg.get("train_on_prompt", False)),
                          run_config=Path(cfg["_path"]) if "_path" in cfg else None)


@dataclass(frozen=True)
class MergePlan:
    qlora: bool
    why_qlora: str                  # which evidence made it QLoRA ("" when it is not)
    onto: str | None                # None for a plain LoRA adapter
    requantize: str
    bnb_base: bool
    record: TrainingRecord
    fmt: str = "nf4"                # the format of the base it was trained on (when qlora)


def plan_merge(base_dir: Path, adapter: str | Path, quant: str, onto: str | None, requantize: str) -> MergePlan:
    """The `MergePlan` of the flags (module docstring); InputError for a combination that cannot be."""
    if onto is not None and onto not in ONTO:
        raise InputError(f"--onto must be one of {', '.join(ONTO)}, got {onto!r}")
    if requantize not in REQUANTIZE:
        raise InputError(f"--requantize must be one of {', '.join(REQUANTIZE)}, got {requantize!r}")
    record = training_record(adapter)
    bnb_format = bnb_checkpoint_format(base_dir)
    bnb_base = bnb_format is not None
    bits = "4-bit" if bnb_format == "nf4" else "8-bit"
    fmt = bnb_format or "nf4"
    if quant in QUANTIZED:
        why, fmt = f"--quant {quant}", quant
        if bnb_base and quant != bnb_format:
            raise InputError(f"--quant {quant}: the base {base_dir} is a bitsandbytes {bits} checkpoint, which loads "
                             f"as {bnb_format} whatever --quant says: give --quant {bnb_format} or none")
    elif bnb_base:
        why = f"the base {base_dir} is a bitsandbytes {bits} checkpoint"
    elif record.quant in QUANTIZED:
        why, fmt = f"its run trained it with quant {record.quant} ({record.run_config})", record.quant
    else:
        why = ""
    if not why:
        for flag, value in (("--onto", onto), ("--requantize", None if requantize == "none" else requantize)):
            if value is not None:
                raise InputError(f"{flag} {value}: only for a QLoRA adapter (trained on an NF4 base), and "
                                 f"{adapter} is not one: no --quant nf4, its run did not record quant nf4 and the "
                                 "base is not 4-bit; a LoRA adapter has one base to merge onto (pass --quant nf4 "
                                 "if it was trained with QLoRA)")
        return MergePlan(False, "", None, "none", False, record)
    if bnb_base and onto == "original":
        raise InputError(f"--onto original: the base {base_dir} is a bitsandbytes {bits} checkpoint, so its "
                         "original 16-bit weights are not there; only --onto quantized is possible (or give "
                         "the 16-bit base folder as --model)")
    if requantize == "nf4" and fmt != "nf4":
        raise InputError(f"--requantize nf4 writes a 4-bit model from an NF4 (QLoRA) adapter; {adapter} was trained on "
                         f"a {fmt} base ({why}): merge it without --requantize")
    default = "quantized" if bnb_base else DEFAULT_ONTO[requantize]
    return MergePlan(True, why, onto or default, requantize, bnb_base, record, fmt)


@dataclass(frozen=True)
class DriftOptions:
    """Where and how the merged folder's drift from the model as trained is measured (CLI flags)."""

    data: str | None = None    # --drift-data; None: the adapter's training data (QLoRA), else unmeasured
    samples: int = 32          # the first N samples of the file, in file order; 0: not measured
    max_len: int = 512         # tokens per sample (longer ones truncated)
    batch_size: int = 4
    device: str = "auto"


@dataclass
class DriftPlan:
    """The samples to measure on (None: unmeasured) and the line that says why or on what."""

    samples: list[Sample] | None
    note: str
    data: str | None = None


HOW_TO_MEASURE = "measure it with --drift-data FILE (any format engine.train reads)"


def plan_drift(plan: MergePlan, options: DriftOptions | None, base_dir: Path) -> DriftPlan:
    """Read and tokenize the drift samples now, before any weight (InputError for a bad file)."""
    if options is None:
        return DriftPlan(None, "unmeasured: not requested")
    if options.samples == 0:
        return DriftPlan(None, "unmeasured: --drift-samples 0")
    for flag, value, least in (("--drift-samples", options.samples, 0), ("--drift-max-len", options.max_len, 2),
                               ("--drift-batch-size", options.batch_size, 1)):
        if value < least:
            raise InputError(f"{flag} {value}: expected at least {least}")
    if options.data is not None:
        path = Path(options.data)
        if not path.is_file():
            raise InputError(f"--drift-data {path}: no such file")
    elif plan.qlora and plan.record.data is not None:
        path = plan.record.data
    else:
        why = ("the adapter records no training data file that still exists" if plan.qlora
               else "a plain LoRA merge is measured only with --drift-data")
        return DriftPlan(None, f"unmeasured: {why}; {HOW_TO_MEASURE}")
    samples, _ = load_samples(path, load_tokenizer(base_dir), max_len=options.max_len,
                              format=None if plan.record.format == "auto" else plan.record.format,
                              train_on_prompt=plan.record.train_on_prompt, limit=options.samples)
    note = f"first {len(samples)} samples of {path}, up to {options.max_len} tokens each"
    if options.data is None and plan.record.data_changed:
        note += " (the file changed since the run: its sha256 is not the one the adapter records)"
    return DriftPlan(samples, note, str(path))
