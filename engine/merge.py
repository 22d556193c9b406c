"""``python -m engine.merge --model BASE --adapter DIR --out DIR``: fold a LoRA adapter into its base
and write a plain HF-format model folder that transformers, vLLM and our own loader read.

Each adapted weight becomes W' = W + s B A (summed in fp32, stored in ``--dtype``). The folder holds
sharded safetensors (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, or a
single ``model.safetensors``), ``config.json``, ``generation_config.json``, the base's tokenizer
files and a README saying what was merged. With ``--quant nf4`` (an adapter trained with QLoRA) the
base is first rounded to NF4 exactly as in training and the adapter is merged onto its dequantized
weights; the README and the console say so. The folder is built under a temporary name and renamed.

``--out`` is checked before any weight is read: never the base model's folder or the adapter's,
nor a folder holding them; an existing folder is replaced (``--overwrite``) only when it is a merged
folder this command wrote (its ``merge.json``) or is empty.

Two more modes, without ``--model``:

* ``--combine linear|ties|dare_ties --adapter A --adapter B ... --weights 0.6,0.4 [--density D]
  [--seed S] --out DIR`` folds several adapters into one PEFT adapter folder, as PEFT's
  ``add_weighted_adapter`` does (`engine.adapters.combine`).
* ``--check-vllm --adapter DIR`` says whether vLLM can serve the adapter as LoRA and what to change
  if not (`engine.adapters.vllm_rules`); exit status 0 when it can, 1 when it cannot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import models
from engine.adapters import (
    MergeReport,
    adapter_targets,
    load_adapter,
    merge,
    read_adapter_config,
    read_adapter_weights,
    read_head_weight,
)
from engine.adapters.combine import COMBINATIONS, MAJORITY_SIGN, combine_main
from engine.adapters.vllm_rules import check_vllm_main
from engine.cli import ArgumentParser
from engine.errors import InputError, run_cli
from engine.atomic import atomic_dir
from engine.run.folder import is_inside
from engine.run.setup import DTYPES
from models.loading import read_config, save_model, weight_files
from models.quantized import dequantize_linears, quantize_linears

MERGE_MARKER = "merge.json"  # what makes a folder one this command wrote (and may replace)
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def stored_dtype(model_dir: Path, default: torch.dtype) -> torch.dtype:
    """The float dtype the checkpoint's tensors are stored in (``default`` if not one we load)."""
    with safe_open(str(weight_files(model_dir)[0]), framework="pt") as f:
        name = next(iter(f.keys()), None)
        code = f.get_slice(name).get_dtype() if name is not None else None
    return SAFETENSORS_DTYPES.get(code, default)


def write_side_files(model: nn.Module, base_dir: Path, out: Path) -> None:
    """generation_config.json and the tokenizer files of the base (config.json comes with the weights)."""
    hf = model.config.to_hf_config()
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    if not (out / "generation_config.json").exists():
        gen = {"bos_token_id": hf.get("bos_token_id"), "eos_token_id": hf.get("eos_token_id")}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def readme_text(base: str, adapter: str, dtype: torch.dtype, report: MergeReport) -> str:
    lines = [
        "# Merged LoRA model", "",
        f"- base model: `{base}`",
        f"- adapter: `{adapter}`",
        f"- weights: {HF_DTYPE_NAMES[dtype]}; {report.summary()}.",
    ]
    if report.dequantized:
        lines.append("- NF4 base: the adapter was trained on a 4-bit (NF4) base, so it was merged onto the "
                     "dequantized NF4 weights, not onto the original full-precision ones.")
    lines += ["", "Written by `python -m engine.merge`.", ""]
    return "\n".join(lines)


def check_out(out: Path, base_dir: Path, adapter: Path, overwrite: bool) -> None:
    """Raise InputError unless ``out`` may receive the merged model (see the module docstring)."""
    for what, path in (("the base model", base_dir), ("the adapter", adapter)):
        if path.exists() and (is_inside(out, path) or is_inside(path, out)):
            raise InputError(f"--out {out}: is or holds {what} ({path}), which the merge reads; choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not _written_by_merge(out):
        raise InputError(f"--out {out}: holds files not written by engine.merge (no {MERGE_MARKER}); nothing "
                         "there is replaced: choose another folder")
    if not overwrite:
        raise InputError(f"--out {out}: already holds a merged model (pass --overwrite to replace it)")


def _written_by_merge(folder: Path) -> bool:
    """Its merge.json, or (folders merged before that marker existed) the README this command writes."""
    readme = folder / "README.md"
    return (folder / MERGE_MARKER).is_file() or (
        readme.is_file() and "Written by `python -m engine.merge`." in readme.read_text(errors="replace"))


def merge_to_folder(base: str, adapter: str, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                    quant: str = "none", max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> MergeReport:
    """Load ``base`` (+ NF4 rounding when ``quant='nf4'``) and ``adapter``, merge, write an HF folder at ``out``."""
    out = Path(out)
    if quant not in ("none", "nf4"):
        raise InputError(f"--quant must be 'none' or 'nf4', got {quant!r}")
    base_dir = models.resolve_model_dir(base)
    check_out(out, base_dir, Path(adapter), overwrite)
    adapter_cfg, adapter_weights = read_adapter_config(adapter), read_adapter_weights(adapter)
    if read_head_weight(adapter, adapter_cfg) is not None:
        raise InputError(f"--adapter {adapter}: a reward model (a score head beside LoRA): merging it would give a "
                         "causal LM without its head; score with it through engine.reward_model instead")
    with torch.device("meta"):  # the adapter fits the base: checked before any weight is read
        adapter_targets(models.LlamaForCausalLM(read_config(base_dir)), adapter, adapter_cfg, adapter_weights)
    # Load at the checkpoint's own precision and round each merged weight once, to ``dtype``.
    model = models.load_model(base, dtype=stored_dtype(base_dir, dtype), device="cpu")
    if quant == "nf4":
        quantize_linears(model)
    load_adapter(model, adapter)
    report = merge(model, dtype)
    report.dequantized += dequantize_linears(model, dtype)  # NF4 layers the adapter did not target
    model.to(dtype)

    with atomic_dir(out) as tmp:
        save_model(model, tmp, max_shard_bytes=max_shard_bytes)  # config.json + (sharded) safetensors
        write_side_files(model, Path(base_dir), tmp)
        (tmp / "README.md").write_text(readme_text(base, adapter, dtype, report))
        marker = {"format": "lora-engine merge", "base": base, "adapter": str(adapter),
                  "dtype": HF_DTYPE_NAMES[dtype], "quant": quant, "dequantized": report.dequantized}
        (tmp / MERGE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m engine.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Base model: preset name or HF-format folder. Required to merge.")
    p.add_argument("--adapter", action="append", default=[], help="PEFT-format LoRA adapter folder. Required; "
                   "with --combine, once per adapter.")
    p.add_argument("--out", help="Output folder for the merged HF-format model (with --combine: the adapter). "
                   "Required unless --check-vllm.")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="Dtype of the merged weights "
                   "(default: bf16).")
    p.add_argument("--quant", choices=("none", "nf4"), default="none",
                   help="nf4: the adapter was trained with QLoRA; merge onto the NF4-rounded base (default: none).")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="Largest safetensors shard, in GiB (default: 2).")
    p.add_argument("--overwrite", action="store_true", help="Replace --out when it holds a merged model this "
                   "command wrote.")
    combine = p.add_argument_group("combining adapters (engine.adapters.combine) and vLLM checks")
    combine.add_argument("--combine", choices=COMBINATIONS, help="Fold the --adapter folders into one adapter at "
                         "--out, as PEFT's add_weighted_adapter with this combination_type.")
    combine.add_argument("--weights", help="With --combine: one weight per --adapter, comma-separated (e.g. 0.6,0.4).")
    combine.add_argument("--density", type=float, help="ties/dare_ties: fraction of entries kept, in (0, 1]. "
                         "Required for them.")
    combine.add_argument("--majority-sign", choices=MAJORITY_SIGN, default="total", help="ties/dare_ties: how the "
                         "sign is elected (PEFT's majority_sign_method; default: total).")
    combine.add_argument("--seed", type=int, default=0, help="dare_ties: seed of the random drop (default: 0).")
    combine.add_argument("--check-vllm", action="store_true", help="Say whether vLLM can serve --adapter as LoRA "
                         "and what to change if not; exit 0 when it can, 1 when it cannot.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_vllm:
        return check_vllm_main(args.adapter)
    if args.combine is not None:
        return combine_main(args)
    if args.model is None or args.out is None or len(args.adapter) != 1:
        raise InputError("merging needs --model, one --adapter and --out (or use --combine / --check-vllm)")
    args.adapter = args.adapter[0]
    if not (math.isfinite(args.max_shard_gb) and args.max_shard_gb > 0):
        raise InputError(f"--max-shard-gb must be a positive number, got {args.max_shard_gb}")
    report = merge_to_folder(args.model, args.adapter, args.out, DTYPES[args.dtype], args.quant,
                             int(args.max_shard_gb * 1024**3), args.overwrite)
    print(f"{report.summary()}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
