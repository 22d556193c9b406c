"""Pre-quantized bitsandbytes 4-bit (NF4) checkpoints, read without bitsandbytes.

transformers saves a model loaded with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`` as an ordinary folder whose ``config.json`` carries a
``quantization_config`` (``quant_method: "bitsandbytes"``) and whose safetensors hold, for every
quantized linear ``<prefix>`` (a module name such as ``model.layers.0.mlp.up_proj``):

    <prefix>.weight                                    (n/2, 1) uint8: two NF4 codes per byte
    <prefix>.weight.absmax                             per-block scales: fp32, or uint8 codes
    <prefix>.weight.quant_map                          (16,) fp32: the NF4 table
    <prefix>.weight.nested_absmax, .nested_quant_map   only with double quantization
    <prefix>.weight.quant_state.bitsandbytes__nf4      uint8 bytes of a JSON: blocksize, shape,
                                                       dtype, nested_blocksize, nested_offset

Everything else (embeddings, norms, lm_head, modules in ``llm_int8_skip_modules``) is stored
dense. The keys of one linear may be spread over several shards, so `BnbNF4Groups` collects them
until a linear is complete, then rebuilds its `NF4Tensor` with `from_bnb_state_dict` (byte-compatible
with bitsandbytes; `to_bnb_state_dict` is the way back). Only decoder-block linears may be
quantized: our lm_head and embeddings stay dense, as transformers keeps them. `bnb_checkpoint_format`
tells which bnb format a folder declares; 8-bit (LLM.int8) folders are read by `models.bnb8_checkpoint`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kernels.nf4 import NF4Tensor, check_blocksize
from models.errors import InputError
from models.key_groups import Group, KeyGroups

QUANT_STATE_SUFFIX = "weight.quant_state.bitsandbytes__"
# The keys of one quantized linear, after "<prefix>."; the last two only with double quantization.
BASE_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", QUANT_STATE_SUFFIX + "nf4")
NESTED_SUFFIXES = ("weight.nested_absmax", "weight.nested_quant_map")
_BNB_KEY = re.compile(r"^(?P<prefix>.+?)\.(?P<suffix>weight\.(absmax|quant_map|nested_absmax|nested_quant_map"
                      r"|quant_state\.bitsandbytes__\w+))$")
_BLOCK_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$")


# ----------------------------------------------------------------------------- one linear's keys, both ways


def module_prefix(prefix: str) -> str:
    """``"model.layers.0.mlp.up_proj"`` or ``"...up_proj."`` -> ``"...up_proj."`` (``""`` stays ``""``)."""
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_bnb_state_dict(q: NF4Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """bitsandbytes' serialized keys for a Linear4bit weight under module ``prefix`` (e.g.
    ``"model.layers.0.mlp.up_proj"``): packed weight (n/2, 1) uint8, absmax, quant_map, nested
    tensors, and the JSON of the non-tensor fields packed as a uint8 tensor (bnb's key order)."""
    p = module_prefix(prefix)
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": _dtype_name(q.dtype), "shape": list(q.shape)}
    out = {p + "weight": q.packed.view(-1, 1), p + "weight.absmax": q.absmax, p + "weight.quant_map": q.code}
    if q.double_quant:
        out[p + "weight.nested_absmax"] = q.nested_absmax
        out[p + "weight.nested_quant_map"] = q.nested_code.clone()
        meta.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=q.offset.item())
    out[p + QUANT_STATE_SUFFIX + "nf4"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def _require(state_dict: dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"bitsandbytes state dict: missing key {key!r}")
    return state_dict[key]


def from_bnb_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "") -> NF4Tensor:
    """Rebuild an `NF4Tensor` from bitsandbytes' keys under ``prefix`` (see `to_bnb_state_dict`)."""
    p = module_prefix(prefix)
    key = p + QUANT_STATE_SUFFIX + "nf4"
    meta = json.loads(bytes(_require(state_dict, key).cpu().tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{key}: quant_type {meta.get('quant_type')!r} not supported, expected 'nf4'")
    check_blocksize(meta["blocksize"])
    packed = _require(state_dict, p + "weight")
    packed = (packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)).reshape(-1)  # quant_storage
    shape = torch.Size(meta["shape"])
    if packed.numel() != -(-math.prod(shape) // 2):
        raise ValueError(f"{p}weight: {packed.numel()} bytes do not hold shape {tuple(shape)} at 4 bits")
    nested = p + "weight.nested_absmax" in state_dict
    absmax = _require(state_dict, p + "weight.absmax")
    q = NF4Tensor(packed=packed, absmax=absmax if nested else absmax.float(), blocksize=meta["blocksize"],
                  shape=shape, dtype=getattr(torch, meta["dtype"]),
                  code=_require(state_dict, p + "weight.quant_map").float())
    if nested:
        q.nested_absmax = state_dict[p + "weight.nested_absmax"].float()
        q.nested_code = _require(state_dict, p + "weight.nested_quant_map").float()
        q.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
        q.nested_blocksize = int(meta["nested_blocksize"])
    if q.absmax.numel() != -(-q.numel // q.blocksize):
        raise ValueError(f"{p}weight.absmax: {q.absmax.numel()} scales, expected one per {q.blocksize} elements")
    return q


# ----------------------------------------------------------------------------- checkpoint folders


def bnb_checkpoint_format(model_dir: Path) -> str | None:
    """The pre-quantized format ``config.json`` declares: None (no quantization), ``"nf4"``
    (bitsandbytes 4-bit NF4, read here) or ``"int8"`` (bitsandbytes 8-bit LLM.int8, read by
    `models.bnb8_checkpoint`); `InputError` naming config.json for any other (fp4, GPTQ...)."""
    path = model_dir / "config.json"
    try:
        qc = json.loads(path.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise InputError(f"{path}: not a readable JSON object ({err})") from None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise InputError(f"{path}: quantization_config must be an object, got {qc!r}")
    # Configs written before transformers named the method carry only the load_in_* flags.
    method = qc.get("quant_method", "bitsandbytes" if "load_in_4bit" in qc or "load_in_8bit" in qc else None)
    if method != "bitsandbytes":
        raise InputError(f"{path}: quantization_config.quant_method={method!r} is not supported "
                         "(only bitsandbytes 4-bit NF4 and 8-bit checkpoints load pre-quantized)")
    four_bit = qc.get("load_in_4bit", qc.get("_load_in_4bit", False))
    eight_bit = qc.get("load_in_8bit", qc.get("_load_in_8bit", False))
    if four_bit and eight_bit:
        raise InputError(f"{path}: quantization_config sets both load_in_4bit and load_in_8bit; expected one")
    if eight_bit:
        return "int8"
    if not four_bit:
        raise InputError(f"{path}: bitsandbytes quantization_config sets neither load_in_4bit nor "
                         "load_in_8bit; expected 4-bit NF4 (load_in_4bit=true, bnb_4bit_quant_type='nf4') "
                         "or 8-bit (load_in_8bit=true)")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default is fp4
    if quant_type != "nf4":
        raise InputError(f"{path}: bnb_4bit_quant_type={quant_type!r} is not supported; only 'nf4' "
                         "(load the dense model with quantize='nf4' instead)")
    return "nf4"


def is_bnb_nf4_checkpoint(model_dir: Path) -> bool:
    """True if ``config.json`` declares a bitsandbytes 4-bit NF4 checkpoint, False if it declares no
    quantization; `InputError` naming config.json for any other quantization (fp4, 8-bit, GPTQ...),
    for callers that handle only NF4 (merging)."""
    fmt = bnb_checkpoint_format(model_dir)
    if fmt == "int8":
        raise InputError(f"{model_dir / 'config.json'}: bitsandbytes 8-bit (LLM.int8) checkpoints are not "
                         "supported here; only 4-bit NF4 (load_in_4bit=true, bnb_4bit_quant_type='nf4')")
    return fmt == "nf4"


def _split(name: str) -> tuple[str, str] | None:
    """(module prefix, bnb suffix) for a key of the bnb family other than the packed weight."""
    match = _BNB_KEY.match(name)
    return (match["prefix"], match["suffix"]) if match else None


def scan_quantized_linears(files: list[Path], expected: dict[str, tuple[int, ...]]) -> set[str]:
    """The module prefixes that carry bnb keys in any of ``files`` (headers only, no tensor read).

    Raises `InputError` naming file and key for a non-NF4 quant state or a quantized module
    that is not a decoder-block linear of this config.
    """
    prefixes: set[str] = set()
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                keys = list(f.keys())
        except SafetensorError as err:
            raise InputError(f"{file}: unreadable safetensors file (truncated or corrupt?): {err}") from None
        for name in keys:
            split = _split(name)
            if split is None:
                continue
            prefix, suffix = split
            if suffix.startswith(QUANT_STATE_SUFFIX) and suffix != QUANT_STATE_SUFFIX + "nf4":
                raise InputError(f"{file}: tensor {name!r}: quant type "
                                 f"{suffix.removeprefix(QUANT_STATE_SUFFIX)!r} is not supported, only nf4")
            if not _BLOCK_LINEAR.match(prefix) or prefix + ".weight" not in expected:
                raise InputError(f"{file}: tensor {name!r}: only decoder-block linears of this config.json "
                                 "may be 4-bit quantized (embeddings, norms and lm_head must be dense)")
            prefixes.add(prefix)
    return prefixes


class BnbNF4Groups(KeyGroups):
    """Collects the bnb keys of each quantized linear, across files, into `NF4Tensor`s on the
    device (`models.key_groups.KeyGroups`: ``claims``, ``add``, ``finish``)."""

    def __init__(self, files: list[Path], expected: dict[str, tuple[int, ...]], device: torch.device | str):
        super().__init__(expected, device)
        self.quantized = scan_quantized_linears(files, expected)

    def prefix_of(self, name: str) -> str | None:
        """The quantized linear a key belongs to (its packed ``.weight`` or a statistic), else None."""
        split = _split(name)
        if split is not None:
            prefix = split[0]
        elif name.endswith(".weight"):
            prefix = name.removesuffix(".weight")
        else:
            return None
        return prefix if prefix in self.quantized else None

    def missing(self, prefix: str, group: Group) -> list[str]:
        """The suffixes the group still lacks (the nested ones are needed iff its quant state says so)."""
        missing = [s for s in BASE_SUFFIXES if s not in group]
        if not missing and "nested_offset" in self._quant_state(prefix, group):
            missing = [s for s in NESTED_SUFFIXES if s not in group]
        return missing

    @staticmethod
    def _quant_state(prefix: str, group: Group) -> dict:
        tensor, file = group[QUANT_STATE_SUFFIX + "nf4"]
        try:
            meta = json.loads(bytes(tensor.tolist()).decode("utf-8"))
        except (ValueError, TypeError, UnicodeDecodeError) as err:
            raise InputError(f"{file}: tensor {prefix}.{QUANT_STATE_SUFFIX}nf4 is not a JSON quant state ({err})") from None
        if not isinstance(meta, dict):
            raise InputError(f"{file}: tensor {prefix}.{QUANT_STATE_SUFFIX}nf4 is not a JSON object")
        return meta

    def build(self, prefix: str, group: Group) -> NF4Tensor:
        try:
            q = from_bnb_state_dict({f"{prefix}.{s}": t for s, (t, _) in group.items()}, prefix)
        except (ValueError, KeyError, TypeError) as err:
            files = ", ".join(sorted({str(f) for _, f in group.values()}))
            raise InputError(f"{files}: quantized linear {prefix}: {type(err).__name__}: {err}") from None
        self.check_shape(prefix, group, tuple(q.shape))
        return q.to(self.device)
