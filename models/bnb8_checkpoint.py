"""Pre-quantized bitsandbytes 8-bit (LLM.int8) checkpoints <-> `Int8Tensor`, without bitsandbytes.

transformers saves a model loaded with ``BitsAndBytesConfig(load_in_8bit=True)`` as an ordinary
folder whose ``config.json`` carries a ``quantization_config`` (``quant_method: "bitsandbytes"``,
``load_in_8bit: true``) and whose safetensors hold, for every quantized linear ``<prefix>`` (a
module name such as ``model.layers.0.mlp.up_proj``), what bitsandbytes' ``Linear8bitLt`` writes:

    <prefix>.weight          (out, in) int8: the codes, row-major ("CB")
    <prefix>.SCB             (out,) fp32: the absmax of each output row, W[o, :] ~= weight[o, :] * SCB[o] / 127
    <prefix>.weight_format   () uint8: the layout of ``weight``, 0 = "row" (older files lack it: row)

which are exactly an `Int8Tensor`'s ``codes`` and ``absmax`` (`kernels.int8` rounds as bitsandbytes
does, so nothing is re-rounded). Layouts other than row-major (1 col32, 2 col_turing, 3 col_ampere,
written by bitsandbytes before 0.43) are refused. Everything else (embeddings, norms, lm_head, biases,
modules in ``llm_int8_skip_modules``) is stored dense. A linear's keys may be spread over shards, so
`BnbInt8Groups` collects them until a linear is complete (codes and SCB; weight_format when the
folder has one for it), then rebuilds its `Int8Tensor` with `from_bnb8_state_dict`
(`to_bnb8_state_dict` is the way back). Only decoder-block linears may be quantized (`should_quantize`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kernels.int8 import Int8Tensor
from models.bnb_checkpoint import module_prefix
from models.errors import InputError
from models.key_groups import Group, KeyGroups
from models.quantized import should_quantize

ROW_FORMAT = 0  # bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]
FORMAT_NAMES = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}
REQUIRED_SUFFIXES = ("weight", "SCB")
FORMAT_SUFFIX = "weight_format"
_STAT_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<suffix>SCB|weight_format)$")
_NF4_KEY = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$")


# ----------------------------------------------------------------------------- one linear's keys, both ways


def to_bnb8_state_dict(q: Int8Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """bitsandbytes' serialized keys of a ``Linear8bitLt`` weight under module ``prefix``, in its
    order: codes (out, in) int8 as ``weight``, absmax (out,) fp32 as ``SCB``, ``weight_format`` 0 (row)."""
    p = module_prefix(prefix)
    return {p + "weight": q.codes, p + "SCB": q.absmax,
            p + FORMAT_SUFFIX: torch.tensor(ROW_FORMAT, dtype=torch.uint8)}


def _require(state_dict: dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"bitsandbytes 8-bit state dict: missing key {key!r}")
    return state_dict[key]


def check_weight_format(value: torch.Tensor, key: str) -> None:
    """ValueError unless ``value`` is bitsandbytes' row-major layout code (a one-element integer 0)."""
    if value.numel() != 1 or value.is_floating_point() or value.is_complex():
        raise ValueError(f"{key}: expected a one-element integer tensor (0 = row-major), "
                         f"got {value.dtype} of shape {tuple(value.shape)}")
    code = int(value.reshape(()).item())
    if code != ROW_FORMAT:
        name = FORMAT_NAMES.get(code, "unknown")
        raise ValueError(f"{key}: weight_format {code} ({name!r}) is not supported; expected 0 ('row', "
                         "row-major codes as bitsandbytes >= 0.43 saves them)")


def from_bnb8_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "",
                         dtype: torch.dtype = torch.float16) -> Int8Tensor:
    """Rebuild an `Int8Tensor` from bitsandbytes' keys under ``prefix`` (see `to_bnb8_state_dict`).

    ``dtype`` is the tensor's dequantization dtype; the file does not record one (bitsandbytes
    quantizes from fp16, hence the default; the loader passes its compute dtype). ValueError for
    codes that are not 2-D int8, an SCB that is not (out,) finite and >= 0, or a non-row layout."""
    p = module_prefix(prefix)
    codes, scb = _require(state_dict, p + "weight"), _require(state_dict, p + "SCB")
    if p + FORMAT_SUFFIX in state_dict:
        check_weight_format(state_dict[p + FORMAT_SUFFIX], p + FORMAT_SUFFIX)
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError(f"{p}weight: expected (out, in) int8 codes, got {codes.dtype} of shape {tuple(codes.shape)}")
    if not scb.is_floating_point() or tuple(scb.shape) != (codes.shape[0],):
        raise ValueError(f"{p}SCB: expected ({codes.shape[0]},) fp32 row absmax for weight {tuple(codes.shape)}, "
                         f"got {scb.dtype} of shape {tuple(scb.shape)}")
    absmax = scb.float()
    if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
        raise ValueError(f"{p}SCB: row absmax values must be finite and >= 0")
    return Int8Tensor(codes=codes, absmax=absmax, dtype=dtype)


# ----------------------------------------------------------------------------- checkpoint folders


def _quantized_prefix(name: str, dtype: str) -> str | None:
    """The module whose 8-bit key ``name`` is (an SCB, a weight_format, or int8 ``.weight`` codes:
    ``dtype`` is the safetensors header's, "I8"), else None."""
    if (match := _STAT_KEY.match(name)) is not None:
        return match["prefix"]
    if name.endswith(".weight") and dtype == "I8":
        return name.removesuffix(".weight")
    return None


def scan_int8_linears(files: list[Path], expected: dict[str, tuple[int, ...]]) -> tuple[set[str], set[str]]:
    """The module prefixes that carry 8-bit keys in any of ``files``, and those of them that have a
    weight_format key (headers only, no tensor read).

    Raises `InputError` naming file and key for a 4-bit key (the folder declares 8-bit) or an 8-bit
    key of a module that is not a decoder-block linear of this config (embeddings, norms, lm_head).
    """
    prefixes: set[str] = set()
    with_format: set[str] = set()
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                headers = [(name, f.get_slice(name).get_dtype()) for name in f.keys()]
        except SafetensorError as err:
            raise InputError(f"{file}: unreadable safetensors file (truncated or corrupt?): {err}") from None
        for name, dtype in headers:
            if _NF4_KEY.search(name):
                raise InputError(f"{file}: tensor {name!r} is a bitsandbytes 4-bit key, but config.json declares "
                                 "an 8-bit checkpoint (load_in_8bit); expected only weight, SCB and weight_format")
            prefix = _quantized_prefix(name, dtype)
            if prefix is None:
                continue
            if not should_quantize(prefix + ".weight") or prefix + ".weight" not in expected:
                raise InputError(f"{file}: tensor {name!r}: only decoder-block linears of this config.json "
                                 "may be 8-bit quantized (embeddings, norms and lm_head must be dense)")
            prefixes.add(prefix)
            if name.endswith("." + FORMAT_SUFFIX):
                with_format.add(prefix)
    return prefixes, with_format


class BnbInt8Groups(KeyGroups):
    """Collects the 8-bit keys of each quantized linear, across files, into `Int8Tensor`s on the
    device whose dequantization dtype is ``dtype`` (`models.key_groups.KeyGroups`: ``claims``,
    ``add``, ``finish``)."""

    label = "8-bit quantized linear"

    def __init__(self, files: list[Path], expected: dict[str, tuple[int, ...]], device: torch.device | str,
                 dtype: torch.dtype):
        super().__init__(expected, device)
        self.dtype = dtype
        # A group waits for its weight_format only where the folder has one (older files lack it).
        self.quantized, self.with_format = scan_int8_linears(files, expected)

    def prefix_of(self, name: str) -> str | None:
        """The quantized linear a key belongs to (its codes, SCB or weight_format), else None."""
        match = _STAT_KEY.match(name)
        prefix = match["prefix"] if match else name.removesuffix(".weight") if name.endswith(".weight") else None
        return prefix if prefix in self.quantized else None

    def missing(self, prefix: str, group: Group) -> list[str]:
        wanted = REQUIRED_SUFFIXES + ((FORMAT_SUFFIX,) if prefix in self.with_format else ())
        return [s for s in wanted if s not in group]

    def build(self, prefix: str, group: Group) -> Int8Tensor:
        try:
            q = from_bnb8_state_dict({f"{prefix}.{s}": t for s, (t, _) in group.items()}, prefix, self.dtype)
        except ValueError as err:
            key = str(err).split(":", 1)[0]
            file = group[key.removeprefix(prefix + ".")][1] if key.startswith(prefix + ".") else group["weight"][1]
            raise InputError(f"{file}: tensor {err}") from None
        self.check_shape(prefix, group, tuple(q.shape))
        return q.to(self.device)
