"""Any preset's exact shapes with random weights, without a download (benchmarks, load tests).

    python -m tools.random_checkpoint --preset llama2-7b --out DIR [--dtype bf16] [--layers N]

writes ``config.json`` and sharded safetensors with ``model.safetensors.index.json``, in the layout
`models.load_model` and transformers read. In Python, `random_model` builds the model directly on
the target device (built on meta, then materialised once), so a 7B model costs one copy.
"""

from __future__ import annotations

import argparse
import math

import torch

from engine.errors import InputError, run_cli
from engine.run.setup import DTYPES
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.loading import save_model
from models.presets import PRESETS

INIT_STD = 0.02


def random_model(preset_or_config: str | LlamaConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", num_layers: int | None = None,
                 seed: int = 0) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` of a preset's (or a config's) shape: linears and embedding ~ N(0, 0.02²),
    biases 0, norm weights 1. ``num_layers`` keeps only the first N blocks (smaller benchmarks)."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise InputError(f"preset {preset_or_config!r}: expected one of {', '.join(PRESETS)}")
        cfg = PRESETS[preset_or_config].config
    else:
        cfg = preset_or_config
    if num_layers is not None:
        cfg = cfg.replace(num_hidden_layers=num_layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)  # casting on meta costs nothing
    model.to_empty(device=device)  # allocate once on the device, no default init
    model.tie_weights()  # to_empty made separate tensors for the tied pair
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight is listed (and drawn) once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, INIT_STD, generator=generator)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.random_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="architecture to build")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight dtype (default bf16)")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="maximum shard size in GB (default 5)")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers <= 0:
        raise InputError(f"--layers {args.layers}: expected a positive number of layers")
    if not (args.shard_gb > 0 and math.isfinite(args.shard_gb)):
        raise InputError(f"--shard-gb {args.shard_gb}: expected a positive size")
    model = random_model(args.preset, DTYPES[args.dtype], "cpu", args.layers, args.seed)
    out = save_model(model, args.out, max_shard_bytes=int(args.shard_gb * 1e9))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.preset} ({n_params:,} parameters, {model.config.num_hidden_layers} layers, "
          f"{args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
