"""``python -m engine.export gguf --model M [--adapter A ...] --out model.gguf --type f16``: a model,
with its LoRA adapters merged, as a llama.cpp GGUF file; ``--lora-only`` writes the one adapter
as a llama.cpp LoRA GGUF instead (``llama-cli -m base.gguf --lora adapter.gguf``).

Merging: the base is loaded in fp32 and each ``--adapter`` is folded in turn, W' = W + s·B·A in fp32
(`engine.adapters.merge`); every tensor is rounded once, when it is encoded. With ``--quant nf4``
(adapters trained with QLoRA) the base is first rounded to NF4 exactly as in training (as
``engine.merge --quant nf4`` does) and the adapters are merged onto its dequantized weights. Types (``--type``):
f32, f16, bf16, q8_0, q4_0; norms and other 1-D tensors stay F32, rows that Q8_0/Q4_0 cannot
split into blocks of 32 fall back to F16, and q4_0 keeps the output matrix in Q8_0 (see
`models.gguf_writer`; the console lists every such tensor). q4_k_m and the other K-quant mixes
are not written: export f16 and run llama.cpp's ``llama-quantize``. ``--lora-only`` takes
f32, f16 (default) or bf16.

Everything is checked before a weight is read (the model's config and tokenizer, each adapter
against the model, ``--out``); the file is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from tqdm import tqdm

import models
from engine.adapters import load_adapter, merge, read_adapter_config, read_adapter_weights, read_head_weight
from engine.adapters.gguf_lora import add_lora_metadata, lora_gguf
from engine.adapters.methods import check_fits
from engine.atomic import atomic_file
from engine.cli import ArgumentParser
from engine.config import QUANTS
from engine.errors import InputError, run_cli
from engine.merge import stored_dtype
from models.gguf_writer import (
    GGUF_TYPES,
    LLAMA_QUANTIZE_ONLY,
    TensorPlan,
    add_llama_metadata,
    add_vocab,
    check_config,
    ggml_type,
    model_tensor_source,
    plan_tensors,
    read_vocab,
    refuse_llama_quantize_only,
    write_gguf,
)
from models.loading import expected_tensors, read_config
from models.quantized import dequantize_linears, quantize_linears

LORA_TYPES = ("f32", "f16", "bf16")


def check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out}: already exists (pass --overwrite to replace it)")


def check_adapters(model_dir: Path, adapters: list[str]) -> None:
    """Each adapter is a mergeable adapter (LoRA, DoRA, IA³) that fits the model (read on a meta
    model: no weights)."""
    for adapter in adapters:
        method = check_fits(read_config(model_dir), adapter, merging=True)
        if method.name == "lora" and read_head_weight(adapter, read_adapter_config(adapter)) is not None:
            raise InputError(f"--adapter {adapter}: a reward model (a score head beside LoRA): a GGUF causal LM "
                             "would lose its head")


def _progress(plans):
    return tqdm(plans, desc="tensors", unit="tensor")


def _report_types(plans: list[TensorPlan]) -> None:
    for p in plans:
        if p.note:
            print(f"{p.name}: {p.note}")


def load_merged(model_dir: Path, adapters: list[str], quant: str) -> dict[str, torch.Tensor]:
    """The state dict of ``model_dir`` with ``adapters`` merged in fp32 (onto the base rounded as
    training rounded it when ``quant`` is nf4, int8 or fp8, loaded at the checkpoint's dtype)."""
    if quant != "none":
        net = models.load_model(model_dir, dtype=stored_dtype(model_dir, torch.bfloat16), device="cpu")
        quantize_linears(net, fmt=quant)
    else:
        net = models.load_model(model_dir, dtype=torch.float32, device="cpu")
    for adapter in adapters:
        load_adapter(net, adapter)
        print(f"{adapter}: {merge(net, torch.float32).summary()}")
    dequantize_linears(net, torch.float32)  # quantized layers no adapter targeted
    return net.state_dict()


def export_model(model: str, adapters: list[str], out: str | os.PathLike, type_name: str = "f16",
                 overwrite: bool = False, quant: str = "none") -> list[TensorPlan]:
    """Merge ``adapters`` into ``model`` and write the GGUF ``out``; return the tensor plans."""
    refuse_llama_quantize_only(type_name)
    if quant not in QUANTS:
        raise InputError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if type_name not in GGUF_TYPES:
        raise InputError(f"--type {type_name!r}: expected one of {', '.join(GGUF_TYPES)}")
    out = Path(out)
    model_dir = models.resolve_model_dir(model)
    cfg = read_config(model_dir)
    check_config(cfg)
    vocab = read_vocab(model_dir, cfg.vocab_size)
    check_adapters(model_dir, adapters)
    check_out(out, overwrite)
    plans = plan_tensors(cfg, expected_tensors(cfg), type_name)

    state = load_merged(model_dir, adapters, quant)

    def metadata(writer) -> None:
        writer.add_name(model_dir.name)
        add_llama_metadata(writer, cfg, GGUF_TYPES[type_name][1])
        add_vocab(writer, vocab)

    with atomic_file(out) as tmp:
        write_gguf(tmp, metadata, plans, model_tensor_source(state, cfg), _progress)
    _report_types(plans)
    return plans


def export_lora(model: str, adapter: str, out: str | os.PathLike, type_name: str = "f16",
                overwrite: bool = False):
    """Write ``adapter`` (for base ``model``) as a llama.cpp LoRA GGUF ``out``; return its `LoraGGUF`."""
    if type_name not in LORA_TYPES:
        raise InputError(f"--type {type_name} with --lora-only: a LoRA GGUF is written as {', '.join(LORA_TYPES)}")
    out = Path(out)
    model_dir = models.resolve_model_dir(model)
    cfg = read_config(model_dir)
    check_config(cfg)
    check_adapters(model_dir, [adapter])
    check_out(out, overwrite)
    lora = lora_gguf(read_adapter_weights(adapter), read_adapter_config(adapter), cfg)  # no base weights needed
    qtype = ggml_type(GGUF_TYPES[type_name][0])
    plans = [TensorPlan(name, name, tuple(t.shape), qtype) for name, t in lora.tensors.items()]

    def metadata(writer) -> None:
        writer.add_name(f"{model_dir.name} LoRA")
        add_lora_metadata(writer, lora)

    with atomic_file(out) as tmp:
        write_gguf(tmp, metadata, plans, lambda p: lora.tensors[p.name], _progress)
    return lora


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m engine.export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="format", required=True, parser_class=ArgumentParser, metavar="FORMAT")
    g = sub.add_parser("gguf", help="llama.cpp GGUF: the merged model, or the adapter alone (--lora-only).",
                       description=__doc__.split("\n\n", 1)[1].strip())
    g.add_argument("--model", required=True, help="Base model: preset name or HF-format folder. Required.")
    g.add_argument("--adapter", action="append", default=[], help="PEFT-format LoRA adapter folder; repeat to "
                   "merge several, one after another.")
    g.add_argument("--out", required=True, help="The .gguf file to write. Required.")
    g.add_argument("--type", choices=(*GGUF_TYPES, *LLAMA_QUANTIZE_ONLY), default="f16",
                   help="Type of the weight matrices (default: f16); q4_k_m: see the module help.")
    g.add_argument("--quant", choices=QUANTS, default="none", help="nf4: the adapters were trained with "
                   "QLoRA (int8, fp8: on that base); merge onto the base rounded that way (default: none).")
    g.add_argument("--lora-only", action="store_true", help="Write the (one) adapter as a llama.cpp LoRA GGUF, "
                   "not merged.")
    g.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.lora_only:
        if args.quant != "none":
            raise InputError("--quant nf4 with --lora-only: a LoRA GGUF holds the adapter alone; llama.cpp applies it "
                             "to whatever base GGUF it is given")
        if len(args.adapter) != 1:
            raise InputError(f"--lora-only writes one adapter; got {len(args.adapter)} --adapter (llama.cpp can "
                             "load several LoRA GGUFs: export each one alone)")
        lora = export_lora(args.model, args.adapter[0], args.out, args.type, args.overwrite)
        print(f"{lora.summary()}; wrote {args.out}")
    else:
        export_model(args.model, args.adapter, args.out, args.type, args.overwrite, args.quant)
        print(f"wrote {args.out} ({args.type}" + (f", {len(args.adapter)} adapter(s) merged)" if args.adapter
                                                  else ")"))
    return 0


if __name__ == "__main__":
    run_cli(main)
