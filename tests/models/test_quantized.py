"""NF4Linear (the runtime module of an NF4 weight) and whole-model conversion both ways."""

import copy

import pytest
import torch

from kernels.frozen import dequantize_frozen
from kernels.nf4 import dequantize_nf4, nf4_dequant_ref, quantize_nf4
from models.bnb_checkpoint import from_bnb_state_dict, to_bnb_state_dict
from models.quantized import FORMATS, NF4Linear, should_quantize
from tests.tolerances import assert_close


def test_module_from_linear_state_dict_and_to():
    torch.manual_seed(3)
    dense = torch.nn.Linear(128, 48)
    layer = NF4Linear.from_linear(dense, blocksize=64, double_quant=True)
    assert (layer.in_features, layer.out_features) == (128, 48) and not layer.bias.requires_grad
    x = torch.randn(2, 5, 128)
    expected = torch.nn.functional.linear(x, dequantize_nf4(layer.weight_nf4, torch.float32), dense.bias)
    assert_close(layer(x), expected, torch.float32, "y")
    # Buffers carry everything: a fresh module loaded from the state dict computes the same thing.
    clone = NF4Linear.from_linear(torch.nn.Linear(128, 48), blocksize=64, double_quant=True)
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone(x), layer(x))
    moved = layer.to("cpu")
    assert moved.weight_nf4.offset.device.type == "cpu" and all(p.device.type == "cpu" for p in moved.buffers())


def test_module_from_bnb_state_dict_and_back_to_a_dense_linear():
    torch.manual_seed(4)
    dense = torch.nn.Linear(192, 32)
    q = quantize_nf4(dense.weight.detach(), 64, True)
    sd = to_bnb_state_dict(q, "model.layers.0.mlp.down_proj.")
    layer = NF4Linear(from_bnb_state_dict(sd, "model.layers.0.mlp.down_proj"), dense.bias)
    assert torch.equal(layer.bias, dense.bias) and layer.weight_nf4.shape == (32, 192)
    x = torch.randn(3, 192)
    expected = torch.nn.functional.linear(x, nf4_dequant_ref(q, torch.float32), dense.bias)
    assert_close(layer(x), expected, torch.float32, "y")
    back = layer.to_linear(torch.float32)
    assert type(back) is torch.nn.Linear and not back.weight.requires_grad and not back.bias.requires_grad
    assert torch.equal(back.weight, nf4_dequant_ref(q, torch.float32))
    assert_close(back(x), expected, torch.float32, "dense again")


def test_should_quantize_selects_the_block_projections_only():
    assert should_quantize("model.layers.3.self_attn.q_proj.weight")
    assert should_quantize("model.layers.0.mlp.down_proj.weight")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_proj.bias", "model.norm.weight"):
        assert not should_quantize(name), name


@pytest.mark.parametrize("held", [False, True], ids=["buffers", "held-as-parameters"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_cast_of_the_model_keeps_the_quantized_weight(fmt, held):
    """``.to(torch.bfloat16)`` / ``.half()`` (what users do to a loaded model) convert the bias but
    leave every tensor of the quantized weight in its dtype, so the weight dequantizes to the same
    values (an NF4 code map or an fp32 scale rounded to bf16 would give other weights), also after
    `hold_as_parameters` turned the integer codes into e4m3 views (FSDP2); and the cast layer
    computes what the uncast one computes on the same bf16 input."""
    torch.manual_seed(5)
    dense = torch.nn.Linear(256, 64)
    layer = FORMATS[fmt].from_linear(dense)
    if held:
        assert layer.hold_as_parameters() > 0
    own = {n: t.dtype for n, t in [*layer.named_buffers(), *layer.named_parameters()] if n != "bias"}
    weight = dequantize_frozen(layer.frozen_weight, torch.float32)
    x = torch.randn(3, 256).bfloat16()
    uncast = copy.deepcopy(layer)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        layer = cast(layer)
        kept = {n: t.dtype for n, t in [*layer.named_buffers(), *layer.named_parameters()] if n != "bias"}
        assert kept == own
        assert torch.equal(dequantize_frozen(layer.frozen_weight, torch.float32), weight)
    assert layer.bias.dtype == torch.float16
    assert torch.equal(copy.deepcopy(uncast).to(torch.bfloat16)(x), uncast(x))
