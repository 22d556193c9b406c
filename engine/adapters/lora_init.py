"""LoRA initialisations (``--lora-init``, `LoRAConfig.init`), as HF PEFT 0.21 defines them, and the
plain-LoRA form of an adapter whose initialisation changed its base (PiSSA, OLoRA).

For a base weight W (out, in), rank r and scale s (alpha / r, rsLoRA alpha / sqrt(r)):

* ``default``: A ~ Kaiming-uniform (a = sqrt 5), B = 0 (`engine.adapters.lora.LoRALinear`);
* ``gaussian``: A ~ N(0, (1/r)^2) (PEFT's ``std=1/r``), B = 0;
* ``pissa`` (Meng et al. 2024): W = V S Uᵀ (full SVD, fp32); with S_r = S[:r] / s,
  A = diag(sqrt S_r) Uᵀ[:r] (r, in), B = V[:, :r] diag(sqrt S_r) (out, r); the base becomes the
  residual W_res = W - s B A, so that W_res + s B A = W;
* ``olora`` (Büyükakyüz 2024): W = Q R (reduced QR, fp32), A = R[:r], B = Q[:, :r] (PEFT does not
  divide by s here), base W_res = W - s B A;
* ``loftq`` (Li et al. 2023), for an NF4 base: from res = W, ``num_iter`` times (PEFT's default 1):
  Q = NF4(res); W - deq(Q) = U S Vᵀ; B = U[:, :r] sqrt(S_r / s), A = sqrt(S_r / s) Vᵀ[:r];
  res = W - s B A. The base becomes Q (for one iteration: NF4(W), exactly what ``--quant nf4``
  loads). PEFT 0.21 assigns A, B without the 1/s (its issue #1982), so that s B A equals the
  residual's rank-r part only when alpha = r; we divide by s so that Q + s B A approximates W
  whatever alpha is (equal to PEFT's for alpha = r).

A base that an init changes is changed in place of the `LoRALinear`'s own: a dense one gets
W_res in its dtype (fp32 arithmetic, rounded once, as PEFT does); an NF4 one (`NF4Linear`) is
dequantized, W_res formed from that, and re-quantized with the same block size and double
quantization (an int8 or FP8 one, a pre-quantized bitsandbytes 8-bit base say, likewise in its
format). So under ``--quant nf4`` a PiSSA/OLoRA base is NF4(deq(NF4(W)) - s B₀ A₀): the
trained model differs from (original base + converted adapter) by that second NF4 rounding.
LoftQ needs the dense W (the residual W - deq(NF4(W)) is the point), so its base must be a dense
``nn.Linear`` (`reads_dense_base`: `engine.run.model.build_model` loads the base dense and
quantizes the linears LoftQ left dense after injection); it turns it into an `NF4Linear`.

Saving (PEFT's ``path_initial_model_for_weight_conversion``): a PiSSA/OLoRA module keeps its
initial A₀, B₀ as buffers (``lora_A0``, ``lora_B0``, not persistent, not trained). Trained, the
layer computes W_res + s B A = W + s (B A - B₀ A₀), which is a plain LoRA on the ORIGINAL base of
rank 2r: A' = [A; A₀] (2r, in), B' = [B, -B₀] (out, 2r), with r' = 2r and alpha' = 2 alpha
(rsLoRA: sqrt(2) alpha) so that the scale is unchanged; ``rank_pattern`` and ``alpha_pattern``
values are doubled (PEFT's rule; rsLoRA with patterns is refused, as PEFT does, since doubling
alpha there would change the scale). The folder is a plain LoRA (``init_lora_weights: true``)
for PEFT, vLLM and us. LoftQ is not converted (PEFT does not): its A, B go on the NF4 base,
which for one iteration is the plain NF4 of the original weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from engine.adapters.lora import LoRAConfig, LoRALinear, dense_base_weight
from engine.errors import InputError
from kernels.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4
from models.quantized import NF4Linear, QuantizedLinear, quantize_weight, quantized_linear

CONVERTED_INITS = ("pissa", "olora")  # the base changes: saved as a rank-2r LoRA on the original base
LOFTQ_ITER = 1  # PEFT's LoftQConfig.loftq_iter default; more would make the base differ from NF4(W)


# ----------------------------------------------------------------------------- the factors (pure)

def pissa_factors(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's (A (r, in), B (out, r)) for an fp32 weight (out, in): s B A = the top-r SVD part."""
    V, S, Uh = torch.linalg.svd(weight, full_matrices=False)
    Sr = S[:r] / scale
    return torch.diag(torch.sqrt(Sr)) @ Uh[:r], V[:, :r] @ torch.diag(torch.sqrt(Sr))


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's (A = R[:r] (r, in), B = Q[:, :r] (out, r)) from the reduced QR of an fp32 weight."""
    Q, R = torch.linalg.qr(weight)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def loftq_factors(weight: torch.Tensor, r: int, scale: float, quantize: Callable[[torch.Tensor], NF4Tensor],
                  num_iter: int = LOFTQ_ITER) -> tuple[NF4Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's (Q, A (r, in), B (out, r)) for a weight (out, in) in its stored dtype (see the module
    docstring); ``quantize`` maps a tensor of that dtype to NF4."""
    if num_iter < 1:
        raise ValueError(f"num_iter must be at least 1, got {num_iter}")
    w = weight.float()
    res = w
    for _ in range(num_iter):
        q = quantize(res.to(weight.dtype))
        U, S, Vh = torch.linalg.svd(w - dequantize_nf4(q, dtype=torch.float32), full_matrices=False)
        root = torch.sqrt(S[:r] / scale)
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        res = w - scale * (B @ A)
    return q, A, B


# ----------------------------------------------------------------------------- modules

def reads_dense_base(config: object) -> bool:
    """Whether injecting ``config`` needs the base weights dense (LoftQ): the caller loads them so
    and quantizes afterwards what the init left dense."""
    return getattr(config, "init", "default") == "loftq"


def initial_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A₀, B₀) of a PiSSA/OLoRA module, None for any other (its saved form is plain)."""
    a0 = getattr(module, "lora_A0", None)
    return None if a0 is None else (a0, module.lora_B0)


def check_init(config: LoRAConfig) -> None:
    if config.init in CONVERTED_INITS and config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise InputError(f"--lora-init {config.init} with rsLoRA and a rank or alpha pattern: the adapter could not "
                         "be saved as a plain LoRA with the same scale (PEFT refuses it too)")


@torch.no_grad()
def initialise_lora(model: nn.Module, config: LoRAConfig, names: list[str]) -> None:
    """Initialise the freshly injected `LoRALinear`s ``names`` of ``model`` per ``config.init`` (the
    global torch RNG draws gaussian's A). Modules on the meta device are left as they are."""
    check_init(config)
    if config.init == "default":
        return
    for name in names:
        module = model.get_submodule(name)
        if _device(module.base).type == "meta":
            continue
        initialise_module(module, config.init)


@torch.no_grad()
def initialise_module(module: LoRALinear, init: str) -> None:
    """One layer's initialisation (see the module docstring); the base is replaced where it changes."""
    r, scale = module.r, module.scale
    if init == "gaussian":
        nn.init.normal_(module.lora_A, std=1 / r)
        nn.init.zeros_(module.lora_B)
        return
    if init == "loftq":
        if not isinstance(module.base, nn.Linear):
            raise InputError("--lora-init loftq needs the dense base weights (their NF4 rounding is what it "
                             "corrects): load the base unquantized; LoftQ quantizes it")
        base = module.base
        q, A, B = loftq_factors(base.weight.detach(), r, scale, quantize_nf4)
        module.base = _frozen(NF4Linear(q, base.bias))
    elif init in CONVERTED_INITS:
        weight, _ = dense_base_weight(module.base)
        A, B = pissa_factors(weight, r, scale) if init == "pissa" else olora_factors(weight, r)
        module.base = _with_weight(module.base, weight - scale * (B @ A))
        module.register_buffer("lora_A0", A.clone(), persistent=False)
        module.register_buffer("lora_B0", B.clone(), persistent=False)
    else:
        raise InputError(f"--lora-init {init!r}: expected default, gaussian, pissa, olora or loftq")
    module.lora_A.copy_(A)
    module.lora_B.copy_(B)


def _with_weight(base: nn.Module, weight: torch.Tensor) -> nn.Module:
    """``base`` holding the fp32 ``weight`` instead: a dense base rounded to its dtype in place, an
    NF4 base re-quantized with its own block size and double quantization, an int8 or FP8 one
    re-quantized in its format."""
    if isinstance(base, NF4Linear):
        q = quantize_nf4(weight.to(base.weight_dtype), blocksize=base.blocksize,
                         double_quant=hasattr(base, "weight_nested_absmax"))
        return _frozen(NF4Linear(q, base.bias).train(base.training))
    if isinstance(base, QuantizedLinear):
        q = quantize_weight(base.format, weight.to(base.weight_dtype))
        return _frozen(quantized_linear(q, base.bias).train(base.training))
    base.weight.copy_(weight.to(base.weight.dtype))
    return base


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _device(base: nn.Module) -> torch.device:
    return base.weight_device if isinstance(base, QuantizedLinear) else base.weight.device


# ----------------------------------------------------------------------------- the saved form

def converted_config(config: LoRAConfig) -> LoRAConfig:
    """The plain rank-2r LoRA configuration with the same scales (PEFT's rule, module docstring)."""
    check_init(config)
    alpha = config.alpha * (math.sqrt(2) if config.use_rslora else 2)
    return dataclasses.replace(config, r=2 * config.r, alpha=alpha, init="default",
                               rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                               alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()})


def converted_pair(module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') = ([A; A₀], [B, -B₀]) for a PiSSA/OLoRA module (whole A, B of the trained layer)."""
    A0, B0 = initial_factors(module)
    return torch.cat([A, A0.to(A)], dim=0), torch.cat([B, -B0.to(B)], dim=1)


def split_converted(name: str, module: nn.Module, A2: torch.Tensor, B2: torch.Tensor,
                    where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained (A, B) from a converted folder's (A' (2r, in), B' (out, 2r)), after checking that
    the other halves are this module's A₀, -B₀ (the folder was trained from this initialisation)."""
    A0, B0 = initial_factors(module)
    r = A0.shape[0]
    if tuple(A2.shape) != (2 * r, A0.shape[1]) or tuple(B2.shape) != (B0.shape[0], 2 * r):
        raise InputError(f"{where}: {name} has A {tuple(A2.shape)}, B {tuple(B2.shape)}; a converted adapter of "
                         f"this rank-{r} layer has A {(2 * r, A0.shape[1])}, B {(B0.shape[0], 2 * r)}")
    for which, got, expected in (("lora_A", A2[r:], A0), ("lora_B", B2[:, r:], -B0)):
        expected = expected.detach().cpu().float()
        # the same init recomputed: equal up to the rounding of a re-run SVD/QR
        if not torch.allclose(got.float(), expected, rtol=1e-5, atol=1e-5 * max(1.0, float(expected.abs().max()))):
            raise InputError(f"{where}: the initial half of {name}.{which} differs from this model's initialisation "
                             f"(max |diff| {float((got.float() - expected).abs().max()):.3e}): the adapter was not "
                             "trained from this base with this --lora-init")
    return A2[:r], B2[:, :r]
