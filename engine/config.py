"""The one source of a run's configuration: `TrainConfig`, and the CLI generated from it.

Every option is a dataclass field whose metadata carries its help text; `build_parser` turns the
fields into argparse flags (``lora_r`` -> ``--lora-r``), a TOML file given with ``--config`` only
overrides field defaults, and the command line overrides the file:

    defaults  <  --config FILE.toml  <  command-line flags

Values that depend on the model or the machine (dtype, max_len, gradient checkpointing) default to
``None`` and are settled by `resolve_defaults` once the model config and device are known.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from engine.errors import InputError
from engine.recipes import RECIPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

METHODS = tuple(RECIPES)
DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge")
FORMATS = ("auto", "text", "completion", "alpaca", "messages", "sharegpt")
SCHEDULES = ("cosine", "linear", "constant")
QUANTS = ("none", "nf4")
LENGTH_POLICIES = ("truncate", "drop", "error")
DTYPES = ("auto", "fp32", "bf16", "fp16")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    # what to train
    model: str = _opt(None, "Model: a local Hugging Face folder or a preset name (e.g. llama2-7b, smollm2-135m).")
    data: str = _opt(None, "Training data: a JSONL or JSON file.")
    method: str = _opt("sft", "Training method.", METHODS)
    format: str = _opt("auto", "Data format; 'auto' detects it from the fields of each file.", FORMATS)
    eval_data: str | None = _opt(None, "Held-out data file for evaluation (same formats as --data).")
    eval_split: float = _opt(0.0, "Fraction of --data held out for evaluation when --eval-data is not given.")
    output: str = _opt("outputs/run", "Output folder: adapter/, checkpoints/, metrics.jsonl, loss.png.")
    overwrite: bool = _opt(False, "Replace an output folder that already holds a finished run.")
    # DPO (--method dpo)
    dpo_beta: float = _opt(0.1, "DPO: beta, the strength of the KL regularisation towards the reference.")
    dpo_loss: str = _opt("sigmoid", "DPO: loss (sigmoid = DPO, robust, ipo, hinge).", DPO_LOSSES)
    dpo_label_smoothing: float = _opt(0.0, "DPO: label smoothing in [0, 0.5) (sigmoid and robust losses).")
    precompute_ref: bool = _opt(False, "DPO: compute the reference log-probs once before training.")
    # length and batching
    max_len: int | None = _opt(None, "Maximum tokens per sample (default: min(model context, 2048)).")
    length_policy: str = _opt("truncate", "What to do with samples longer than --max-len.", LENGTH_POLICIES)
    pack: bool = _opt(False, "Pack samples into full rows of --max-len tokens (attention never crosses samples).")
    train_on_prompt: bool = _opt(False, "Also compute the loss on prompt / user tokens.")
    batch_size: int = _opt(4, "Sequences per micro-batch.")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.")
    epochs: float = _opt(1.0, "Passes over the training data (ignored when --max-steps is set).")
    max_steps: int | None = _opt(None, "Optimizer steps to run (overrides --epochs).")
    # optimisation
    lr: float = _opt(2e-4, "Peak learning rate.")
    lr_schedule: str = _opt("cosine", "Learning-rate schedule after warmup.", SCHEDULES)
    warmup_steps: int | None = _opt(None, "Linear warmup steps (default: 3% of the run).")
    weight_decay: float = _opt(0.0, "AdamW weight decay on the LoRA weights.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_eps: float = _opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this value (0 disables).")
    max_bad_steps: int = _opt(5, "Stop after this many consecutive steps with a non-finite loss or gradient.")
    # LoRA
    lora_r: int = _opt(16, "LoRA rank.")
    lora_alpha: float = _opt(32.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --rslora).")
    lora_dropout: float = _opt(0.05, "Dropout on the LoRA input.")
    rslora: bool = _opt(False, "Rank-stabilised LoRA scaling alpha/sqrt(r).")
    target_modules: str = _opt("all-linear", "Comma-separated module names (q_proj,...,down_proj) or 'all-linear'.")
    init_adapter: str | None = _opt(None, "Start from this PEFT-format adapter folder (ours or made elsewhere).")
    quant: str = _opt("none", "Quantize the frozen base: 'nf4' for QLoRA.", QUANTS)
    # machine
    device: str = _opt("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    dtype: str = _opt("auto", "Compute dtype of the frozen base: auto (bf16 on GPU, fp32 on CPU).", DTYPES)
    grad_checkpointing: bool | None = _opt(None, "Recompute each block in backward (default: on for GPU).")
    seed: int = _opt(42, "Seed for LoRA init, data order and dropout.")
    # schedule of evaluation and checkpoints
    eval_every: int = _opt(0, "Evaluate every N steps (0: only at the end).")
    save_every: int = _opt(0, "Write a resumable checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = _opt(2, "Keep the newest N checkpoints.")
    resume: bool = _opt(False, "Continue from the newest complete checkpoint in --output.")
    log_every: int = _opt(1, "Write a metrics line every N steps.")

    def validate(self) -> None:
        """Raise InputError for values no run can use."""
        if not self.model:
            raise InputError("--model is required (a local folder or a preset name)")
        if not self.data:
            raise InputError("--data is required (a JSONL or JSON file)")
        for name, choices in (("method", METHODS), ("format", FORMATS), ("lr_schedule", SCHEDULES),
                              ("quant", QUANTS), ("length_policy", LENGTH_POLICIES), ("dtype", DTYPES),
                              ("dpo_loss", DPO_LOSSES)):
            if getattr(self, name) not in choices:
                raise InputError(f"--{_flag(name)} {getattr(self, name)!r}: expected one of {', '.join(choices)}")
        positive = ("batch_size", "grad_accum", "lora_r", "keep_checkpoints", "log_every", "max_bad_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{_flag(name)} must be >= 1, got {value}")
        if not 0.0 <= self.eval_split < 1.0:
            raise InputError(f"--eval-split must be in [0, 1), got {self.eval_split}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InputError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lr <= 0 or self.epochs <= 0:
            raise InputError("--lr and --epochs must be positive")
        if self.method == "dpo" and self.pack:
            raise InputError("--pack is for SFT: DPO batches chosen and rejected of each pair together")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _scalar_type(hint: Any) -> Any:
    """The argparse converter for a field's type hint (`int | None` -> int)."""
    args = getattr(hint, "__args__", None)
    if args:
        hint = next(a for a in args if a is not type(None))
    return {int: int, float: float, str: str, bool: _parse_bool}[hint]


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per `TrainConfig` field, defaults left unset (None)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of field = value overrides "
                        "(keys as the flags, with - or _); command-line flags win.")
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kind = _scalar_type(hints[f.name])
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if kind is _parse_bool:
            # --pack / --no-pack, plus --pack=false style for scripts
            parser.add_argument(f"--{_flag(f.name)}", dest=f.name, nargs="?", const=True, default=None,
                                type=_parse_bool, help=help_text + f" (default: {f.default})")
            parser.add_argument(f"--no-{_flag(f.name)}", dest=f.name, action="store_false", default=None,
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{_flag(f.name)}", dest=f.name, type=kind, default=None,
                                choices=f.metadata["choices"], metavar=None if f.metadata["choices"] else f.name.upper(),
                                help=help_text + f" (default: {f.default})")
    return parser


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML override file; unknown keys are errors naming the file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML ({err})") from None
    known = {f.name for f in fields(TrainConfig)}
    overrides = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise InputError(f"{path}: unknown option {key!r}")
        overrides[name] = value
    return overrides


def parse_config(argv: list[str] | None, prog: str = "engine.train",
                 description: str = "") -> TrainConfig:
    """Build a validated TrainConfig from defaults, an optional TOML file and the command line."""
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    values = load_toml(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
