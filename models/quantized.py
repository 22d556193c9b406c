"""Frozen base weights stored quantized at run time: the one module family that owns them
(`QuantizedLinear`: `NF4Linear` for QLoRA, `Int8Linear`, `FP8Linear`), which linears are quantized
(`should_quantize`, the one rule), and whole-model conversion both ways.

Quantization has two phases: the pure functions of `kernels.nf4`, `kernels.int8` and `kernels.fp8`
(quantize / dequantize one weight), then this module, which swaps ``nn.Linear`` modules for a
`QuantizedLinear` of a format (`FORMATS`, by name: ``nf4``, ``int8``, ``fp8``) or back. The loader
quantizes tensor by tensor while reading a checkpoint (`models.loading`), so a model never exists
dense on the device; `quantize_linears` converts a model already in memory. Everything above this
file — LoRA and the other adapters, merging, the trainers — sees a `QuantizedLinear` and its
``frozen_weight`` (`kernels.frozen`), never a format.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.fp8 import E4M3, FP8Tensor, fp8_bytes, quantize_fp8
from kernels.frozen import QuantizedWeight, dequantize_frozen, frozen_linear, is_quantized, storage
from kernels.int8 import Int8Tensor, int8_bytes, quantize_int8
from kernels.nf4 import NESTED_BLOCKSIZE, NF4Tensor, nf4_bytes, quantize_nf4


def should_quantize(weight_name: str) -> bool:
    """Whether a checkpoint tensor is a decoder-block linear weight that a quantized base stores
    quantized (NF4 for QLoRA, int8, FP8).

    ``model.layers.N.<...>_proj.weight``: the attention and MLP projections; embeddings, norms and
    the output head stay in full precision (as in QLoRA and transformers' bitsandbytes path).
    """
    return weight_name.startswith("model.layers.") and weight_name.endswith("_proj.weight")


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantized: ``y = x · Wᵀ + b``, W given by
    ``frozen_weight`` (a `kernels.frozen.QuantizedWeight` rebuilt from the module's buffers, so
    ``.to()`` and ``state_dict()`` carry them). The bias, if any, is a Parameter with
    ``requires_grad=False``. The product is `kernels.frozen.frozen_linear`: gradients for x only,
    no dense weight kept for the backward. Subclasses name their ``format`` and buffers."""

    format: str = ""
    sharded_buffers: tuple[str, ...] = ()  # the buffers worth sharding under FSDP2 (the large ones)

    def _hold(self, q: QuantizedWeight, bias: torch.Tensor | None, **buffers: torch.Tensor) -> None:
        """Shape and original dtype from ``q``, ``buffers`` registered, the bias frozen (subclasses)."""
        self.out_features, self.in_features = q.shape
        self.weight_dtype = q.dtype
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
        self._set_bias(bias)

    def hold_as_parameters(self) -> int:
        """Turn the large buffers (``sharded_buffers``) into frozen parameters, which FSDP2 shards
        and all-gathers as they are: the format's own bytes, never a dequantized copy (buffers it
        would replicate). An integer tensor (codes; NF4's 8-bit absmax) is held as a 1-byte float
        (e4m3) view of the same bytes, since FSDP2 before torch 2.13 makes each sharded parameter
        require a gradient before freezing it, which an integer tensor cannot; `_stored` views it
        back (and `_apply` keeps a later ``.to(dtype)`` from converting those bytes as numbers).
        Returns how many were turned."""
        turned = 0
        for name in self.sharded_buffers:
            tensor = self._buffers.get(name)
            if tensor is None or tensor.dim() == 0:
                continue
            if not tensor.is_floating_point():
                if tensor.element_size() != 1:
                    raise TypeError(f"{name}: a {tensor.dtype} tensor has no 1-byte float view")
                tensor = tensor.view(torch.float8_e4m3fn)
            del self._buffers[name]
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            turned += 1
        return turned

    def _apply(self, fn, recurse: bool = True):
        """``Module.to`` / ``.half()`` / ``.cuda()`` go through here with a conversion ``fn``. The
        weight's own tensors (every buffer: codes, absmax, code maps, scales; and those turned into
        parameters by `hold_as_parameters`) keep their dtypes and only follow ``fn`` to its device:
        a cast would change the format (an NF4 code map or an fp32 scale rounded to bf16 gives
        other weights than the checkpoint's, an e4m3 view of codes would be converted as numbers).
        The bias converts as any parameter does. Products run in the input's dtype anyway
        (`kernels.frozen.frozen_linear`), so ``model.to(torch.bfloat16)`` computes in bf16."""
        own = {id(t) for t in self._buffers.values() if t is not None}
        own |= {id(p) for name, p in self._parameters.items() if p is not None and name != "bias"}

        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            if id(tensor) in own and converted.dtype != tensor.dtype:
                return tensor.to(device=converted.device)
            return converted

        return super()._apply(keep_dtype, recurse)

    def _stored(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The held tensor ``name`` as ``dtype`` (the same bytes; see `hold_as_parameters`)."""
        tensor = getattr(self, name)
        return tensor if tensor.dtype == dtype else tensor.view(dtype)

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias: expected shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def frozen_weight(self) -> QuantizedWeight:
        raise NotImplementedError

    @property
    def weight_device(self) -> torch.device:
        return storage(self.frozen_weight).device

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        """Quantize a dense ``nn.Linear`` (its weight in its own dtype) into this format."""
        return cls(quantize_weight(cls.format, linear.weight.detach()), linear.bias)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` holding the dequantized weight in ``dtype`` (default: the dtype the
        weight was quantized from); frozen like this layer."""
        q = self.frozen_weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(dequantize_frozen(q, dtype or q.dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype or self.bias.dtype), requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.frozen_weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class NF4Linear(QuantizedLinear):
    """A frozen linear layer whose weight is stored in NF4: ``y = x · dequant(Q)ᵀ + b``.

    The NF4 tensors are buffers (``weight_packed``, ``weight_absmax``, ``weight_quant_map`` and,
    with double quantization, ``weight_nested_absmax``, ``weight_nested_quant_map``,
    ``weight_offset``); ``weight_nf4`` (= ``frozen_weight``) reassembles the `NF4Tensor`.
    """

    format = "nf4"
    sharded_buffers = ("weight_packed", "weight_absmax", "weight_nested_absmax")

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise ValueError(f"q: expected a 2-D (out, in) weight, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.blocksize, self.weight_dtype, self.nested_blocksize = q.blocksize, q.dtype, q.nested_blocksize
        self.register_buffer("weight_packed", q.packed)
        self.register_buffer("weight_absmax", q.absmax)
        self.register_buffer("weight_quant_map", q.code)
        if q.double_quant:
            self.register_buffer("weight_nested_absmax", q.nested_absmax)
            self.register_buffer("weight_nested_quant_map", q.nested_code)
            self.register_buffer("weight_offset", q.offset)
        self._set_bias(bias)

    @property
    def frozen_weight(self) -> NF4Tensor:
        return self.weight_nf4

    @property
    def weight_nf4(self) -> NF4Tensor:
        nested = hasattr(self, "weight_nested_absmax")
        return NF4Tensor(
            packed=self._stored("weight_packed", torch.uint8),
            absmax=self._stored("weight_absmax", torch.uint8 if nested else torch.float32), blocksize=self.blocksize,
            shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
            code=self.weight_quant_map,
            nested_absmax=self.weight_nested_absmax if nested else None,
            nested_code=self.weight_nested_quant_map if nested else None,
            offset=self.weight_offset if nested else None,
            nested_blocksize=self.nested_blocksize if nested else NESTED_BLOCKSIZE,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        """Quantize a dense ``nn.Linear`` (its weight in its own dtype) into an `NF4Linear`."""
        q = quantize_nf4(linear.weight.detach().contiguous(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, blocksize={self.blocksize}, "
                f"double_quant={hasattr(self, 'weight_nested_absmax')}")


class Int8Linear(QuantizedLinear):
    """A frozen linear layer whose weight is per-row absmax int8 (`kernels.int8`): buffers
    ``weight_codes`` (out, in) int8 and ``weight_absmax`` (out,) fp32 (bitsandbytes' ``weight``
    and ``SCB``); dequantized to the compute dtype for each product, as NF4 is."""

    format = "int8"
    sharded_buffers = ("weight_codes", "weight_absmax")

    def __init__(self, q: Int8Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self._hold(q, bias, weight_codes=q.codes, weight_absmax=q.absmax)

    @property
    def frozen_weight(self) -> Int8Tensor:
        return Int8Tensor(codes=self._stored("weight_codes", torch.int8), absmax=self.weight_absmax,
                          dtype=self.weight_dtype)


class FP8Linear(QuantizedLinear):
    """A frozen linear layer whose weight is per-row scaled e4m3 (`kernels.fp8`): buffers
    ``weight_codes`` (out, in), the e4m3 bytes held as uint8 (gloo cannot broadcast e4m3, which
    DDP does to buffers, and ``torch.equal`` has no e4m3 kernel on a CPU; a cast no longer
    reaches them, see `_apply`), and ``weight_scale`` (out,) fp32; its products run
    in FP8 (`kernels.fp8_linear`: e4m3 tensor cores on a GPU of compute capability ≥ 8.9, the
    same rounding emulated in fp32 elsewhere)."""

    format = "fp8"
    sharded_buffers = ("weight_codes", "weight_scale")

    def __init__(self, q: FP8Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self._hold(q, bias, weight_codes=q.codes.view(torch.uint8), weight_scale=q.scale)

    @property
    def frozen_weight(self) -> FP8Tensor:
        return FP8Tensor(codes=self.weight_codes.view(E4M3), scale=self.weight_scale, dtype=self.weight_dtype)


# The formats by name (``--quant``): the module class and how one weight is quantized.
FORMATS: dict[str, type[QuantizedLinear]] = {"nf4": NF4Linear, "int8": Int8Linear, "fp8": FP8Linear}
_QUANTIZE = {"nf4": quantize_nf4, "int8": quantize_int8, "fp8": quantize_fp8}
_LINEAR_OF = {NF4Tensor: NF4Linear, Int8Tensor: Int8Linear, FP8Tensor: FP8Linear}


def quantized_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """The bytes one (out, in) weight takes in format ``fmt`` (as its `QuantizedLinear` holds it)."""
    if fmt == "nf4":
        return nf4_bytes(out_features * in_features)
    if fmt == "int8":
        return int8_bytes(out_features, in_features)
    if fmt == "fp8":
        return fp8_bytes(out_features, in_features)
    raise ValueError(f"format {fmt!r}: expected one of {sorted(FORMATS)}")


def quantize_weight(fmt: str, weight: torch.Tensor) -> QuantizedWeight:
    """One (out, in) weight in format ``fmt`` (``nf4``: blocksize 64 with double quantization)."""
    if fmt not in _QUANTIZE:
        raise ValueError(f"format {fmt!r}: expected one of {sorted(_QUANTIZE)}")
    return _QUANTIZE[fmt](weight.contiguous() if fmt == "nf4" else weight)


def quantized_linear(q: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantizedLinear:
    """The module of a quantized weight's format, holding ``q``."""
    if not is_quantized(q):
        raise TypeError(f"q: expected a quantized weight, got {type(q).__name__}")
    return _LINEAR_OF[type(q)](q, bias)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule ``name``, in the same train/eval mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module.train(getattr(parent, child).training))


def quantize_linears(model: nn.Module, blocksize: int = 64, double_quant: bool = True, *,
                     fmt: str = "nf4") -> list[str]:
    """Replace every dense ``nn.Linear`` that `should_quantize` selects by a `QuantizedLinear` of
    format ``fmt`` (``blocksize``/``double_quant``: NF4's); return the names replaced (a quantized
    base on a model already in memory)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {sorted(FORMATS)}")
    converted = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and should_quantize(name + ".weight"):
            quantized = NF4Linear.from_linear(module, blocksize=blocksize, double_quant=double_quant) \
                if fmt == "nf4" else FORMATS[fmt].from_linear(module)
            _replace(model, name, quantized)
            converted.append(name)
    return converted


@torch.no_grad()
def dequantize_linears(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every `QuantizedLinear` by a dense ``nn.Linear`` with its dequantized weight in
    ``dtype`` (default: the dtype it was quantized from); return the names replaced."""
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            _replace(model, name, module.to_linear(dtype))
            names.append(name)
    return names
