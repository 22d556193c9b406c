"""LoRA injection on our Llama: targets, PEFT init, frozen base, disable_adapters, merge, QLoRA bases."""

import copy
import math

import pytest
import torch
from torch import nn

from engine.adapters import (
    LoRAConfig,
    LoRALinear,
    adapter_params,
    disable_adapters,
    find_targets,
    inject_lora,
    lora_modules,
    merge,
    set_trainable,
)
from engine.adapters.lora import LLAMA_LINEARS
from engine.errors import InputError
from kernels.backend import set_kernel_mode
from kernels.nf4 import dequantize_nf4
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.quantized import NF4Linear, dequantize_linears, quantize_linears
from tests.tolerances import assert_close

N_LAYERS = 2


def tiny_model(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B (PEFT's init has B = 0, which would make every adapter test vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def tokens(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("targets, per_layer", [
    ("all-linear", 7), (("q_proj", "v_proj"), 2), (("down_proj",), 1), (r".*\.self_attn\.(k|o)_proj", 2),
])
def test_injection_targets(targets, per_layer):
    model = tiny_model()
    names = inject_lora(model, LoRAConfig(r=4, target_modules=targets))
    assert len(names) == per_layer * N_LAYERS
    assert set(names) == set(lora_modules(model))
    assert all(n.startswith("model.layers.") for n in names)  # never lm_head
    assert isinstance(model.lm_head, nn.Linear)
    assert not any(m.training for m in lora_modules(model).values())  # injection keeps eval mode


def test_all_linear_names_and_exclude():
    model = tiny_model()
    names = find_targets(model, LoRAConfig(target_modules="all-linear", exclude_modules=["gate_proj"]))
    leafs = sorted({n.split(".")[-1] for n in names})
    assert leafs == sorted(set(LLAMA_LINEARS) - {"gate_proj"})
    assert not lora_modules(model)  # find_targets changes nothing


@pytest.mark.parametrize("targets, message", [
    (("q_proj", "qkv_proj"), "'qkv_proj'"),
    (("mlp",), "not a linear layer"),
    (("lm_head",), "output head"),
    ("q_proj", "regex"),
])
def test_bad_targets_name_the_problem(targets, message):
    with pytest.raises(InputError, match=message):
        inject_lora(tiny_model(), LoRAConfig(target_modules=targets))


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "rank r"), ({"alpha": -1.0}, "alpha"), ({"dropout": 1.0}, "dropout"), ({"target_modules": ()}, "empty"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(InputError, match=message):
        LoRAConfig(**kwargs)


def test_double_injection_refused():
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=2))
    with pytest.raises(InputError, match="already has LoRA"):
        inject_lora(model, LoRAConfig(r=2))


@pytest.mark.parametrize("r, alpha, rslora, scale", [(16, 32, False, 2.0), (16, 32, True, 8.0), (5, 7, False, 1.4)])
def test_peft_init_and_scale(r, alpha, rslora, scale):
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=r, alpha=alpha, use_rslora=rslora, target_modules=("up_proj",)))
    m = model.model.layers[0].mlp.up_proj
    assert isinstance(m, LoRALinear) and m.scale == pytest.approx(scale)
    assert m.lora_A.shape == (r, 64) and m.lora_B.shape == (80, r)
    assert m.lora_A.dtype == m.lora_B.dtype == torch.float32
    assert torch.count_nonzero(m.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt 5): sqrt(6 / ((1 + 5) fan_in))
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.8 * bound


def test_at_init_outputs_equal_base():
    model = tiny_model()
    ids = tokens()
    expected = model(ids)
    inject_lora(model, LoRAConfig(r=8, target_modules="all-linear"))
    assert_close(model(ids), expected, torch.float32, "logits at B=0")


@pytest.mark.parametrize("mode", ["auto", "triton"])  # triton: the fused kernel (interpreted on CPU)
@pytest.mark.parametrize("shape", [(3, 16, 8), (5, 123, 77)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_math_and_grads(shape, dtype, mode, device):
    """y = x W^T + b + s (x A^T) B^T and its gradients w.r.t. x, A, B (reference in fp32).

    x, B and the upstream gradient are positive so that the 123-term sums do not cancel: then
    bf16's rounding stays relative to the result and the shared table's tolerance applies.
    """
    n, d_in, d_out = shape
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=True).to(device, dtype)
    m = LoRALinear(base, r=4, alpha=8.0, dropout=0.0).eval()
    with torch.no_grad():
        m.lora_B.uniform_(0.1, 0.3)
    x = torch.rand(n, d_in, dtype=dtype, device=device, requires_grad=True)
    with set_kernel_mode(mode):
        y = m(x)
        grad = torch.rand_like(y)
        y.backward(grad)

    xr = x.detach().float().requires_grad_(True)
    a = m.lora_A.detach().to(dtype).float().requires_grad_(True)
    b = m.lora_B.detach().to(dtype).float().requires_grad_(True)
    yr = xr @ base.weight.float().T + base.bias.float() + 2.0 * (xr @ a.T) @ b.T
    yr.backward(grad.float())
    assert y.dtype == dtype and m.lora_A.grad.dtype == m.lora_B.grad.dtype == torch.float32
    assert_close(y, yr, dtype, "y")
    assert_close(x.grad, xr.grad, dtype, "dx")
    assert_close(m.lora_A.grad, a.grad, dtype, "dA")
    assert_close(m.lora_B.grad, b.grad, dtype, "dB")
    assert base.weight.grad is None and not base.weight.requires_grad


def test_only_lora_params_trainable():
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=4, target_modules=("q_proj", "down_proj")))
    n = set_trainable(model)
    params = adapter_params(model)
    assert n == N_LAYERS * 4 * ((64 + 64) + (80 + 64))  # q: 64->64, down: 80->64
    assert [name for name, p in model.named_parameters() if p.requires_grad] == list(params)
    randomize_lora(model)
    model(tokens()).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in params), name
    assert all(p.grad.abs().sum() > 0 for p in params.values())


def test_disable_adapters_gives_exact_base_logits():
    model = tiny_model()
    ids = tokens()
    base_logits = model(ids)
    inject_lora(model, LoRAConfig(r=4))
    randomize_lora(model)
    adapted = model(ids)
    assert (adapted - base_logits).abs().max() > 1e-2
    with disable_adapters(model):
        assert torch.equal(model(ids), base_logits)
    assert torch.equal(model(ids), adapted)


def test_merge_matches_unmerged_and_restores_plain_linears():
    model = tiny_model(tie=False)
    inject_lora(model, LoRAConfig(r=4, alpha=16, use_rslora=True))
    randomize_lora(model)
    ids = tokens()
    expected = model(ids)
    report = merge(model)
    assert len(report.merged) == 7 * N_LAYERS and not report.dequantized
    assert not lora_modules(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert_close(model(ids), expected, torch.float32, "merged logits")


def test_qlora_base_matches_lora_on_dequantized_base_and_merges():
    """NF4 base: the LoRA model equals LoRA on the dequantized dense weights, before and after merge."""
    qmodel = tiny_model()
    quantized = quantize_linears(qmodel)
    assert len(quantized) == 7 * N_LAYERS and not any(m.training for m in qmodel.modules())
    dense = copy.deepcopy(qmodel)
    assert len(dequantize_linears(dense)) == 7 * N_LAYERS
    torch.manual_seed(3)
    inject_lora(qmodel, LoRAConfig(r=4, target_modules=("q_proj", "up_proj")))
    torch.manual_seed(3)
    inject_lora(dense, LoRAConfig(r=4, target_modules=("q_proj", "up_proj")))
    randomize_lora(qmodel)
    randomize_lora(dense)
    assert isinstance(qmodel.model.layers[0].self_attn.q_proj.base, NF4Linear)
    w = qmodel.model.layers[1].mlp.up_proj.base.weight_nf4
    assert torch.equal(dense.model.layers[1].mlp.up_proj.base.weight, dequantize_nf4(w, dtype=w.dtype))
    ids = tokens()
    expected = dense(ids)
    assert_close(qmodel(ids), expected, torch.float32, "QLoRA logits")
    report = merge(qmodel)
    assert sorted(report.dequantized) == sorted(report.merged) and len(report.merged) == 2 * N_LAYERS
    assert "NF4" in report.summary()
    dequantize_linears(qmodel)
    assert_close(qmodel(ids), expected, torch.float32, "merged QLoRA logits")
