"""RoPE: Triton kernel (forced; interpreter on CPU) against the fp32 reference, outputs and dq, dk,
with packed position ids, GQA and llama3 frequencies; the reference against transformers'
apply_rotary_pos_emb; rope_inv_freq against transformers' rope init functions."""

import pytest
import torch

from kernels.backend import force_triton
from kernels.rope import apply_rope, apply_rope_ref, rope_inv_freq
from tests.tolerances import assert_close

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, T, n_heads, n_kv, head_dim)
SHAPES = [(1, 1, 1, 1, 8), (2, 21, 4, 2, 64), (2, 9, 6, 2, 96), (1, 13, 5, 5, 80)]


def _packed_positions(B, T, device):
    """Row 0 packs documents (positions restart at 0 mid-row); the others start deep into a context."""
    pos = torch.arange(T).repeat(B, 1) + 3000 * torch.arange(B)[:, None]
    pos[0] = torch.cat([torch.arange(T - T // 3), torch.arange(T // 3)])
    return pos.to(device)


def _case(shape, dtype, device, seed=0):
    B, T, nh, nkv, hd = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, nh, hd, generator=g).to(device, dtype)
    k = torch.randn(B, T, nkv, hd, generator=g).to(device, dtype)
    dq = torch.randn(B, T, nh, hd, generator=g).to(device, dtype)
    dk = torch.randn(B, T, nkv, hd, generator=g).to(device, dtype)
    return q, k, dq, dk, _packed_positions(B, T, device), rope_inv_freq(hd, 500000.0, LLAMA3).to(device)


def _fp32_reference(q, k, dq, dk, pos, inv_freq):
    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    qo, ko = apply_rope_ref(q32, k32, pos, inv_freq)
    torch.autograd.backward([qo, ko], [dq.float(), dk.float()])
    return qo, ko, q32.grad, k32.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_reference(shape, dtype, device):
    q, k, dq, dk, pos, inv_freq = _case(shape, dtype, device)
    q_t, k_t = q.clone().requires_grad_(), k.clone().requires_grad_()
    with force_triton():
        qo, ko = apply_rope(q_t, k_t, pos, inv_freq)
    torch.autograd.backward([qo, ko], [dq, dk])
    qo_ref, ko_ref, dq_ref, dk_ref = _fp32_reference(q, k, dq, dk, pos, inv_freq)
    assert qo.dtype == dtype and q_t.grad.dtype == dtype
    assert_close(qo, qo_ref, dtype, "q_out")
    assert_close(ko, ko_ref, dtype, "k_out")
    assert_close(q_t.grad, dq_ref, dtype, "dq")
    assert_close(k_t.grad, dk_ref, dtype, "dk")


def test_rope_broadcast_positions_and_strided_inputs(device):
    """(1, T) positions broadcast over the batch; q/k as transposed (non-contiguous) views."""
    q, k, _, _, _, inv_freq = _case((2, 9, 3, 1, 64), torch.float32, device, seed=2)
    pos = torch.arange(5, 14, device=device)[None, :]
    q_s, k_s = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    with force_triton():
        qo, ko = apply_rope(q_s, k_s, pos, inv_freq)
    qo_ref, ko_ref = apply_rope_ref(q, k, pos.expand(2, -1), inv_freq)
    assert_close(qo, qo_ref, torch.float32, "q_out")
    assert_close(ko, ko_ref, torch.float32, "k_out")


def test_rope_reference_equals_hf(device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      rope_parameters={"rope_theta": 500000.0, **LLAMA3})
    q, k, _, _, pos, _ = _case((2, 21, 4, 2, 64), torch.float32, device, seed=3)
    cos, sin = LlamaRotaryEmbedding(cfg).to(device)(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # our (B, T, heads, hd) layout
    q_ours, k_ours = apply_rope_ref(q, k, pos, rope_inv_freq(64, 500000.0, LLAMA3).to(device))
    assert_close(q_ours, q_hf, torch.float32, "q vs HF")
    assert_close(k_ours, k_hf, torch.float32, "k vs HF")


@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3,
                                     {**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 1024}])
def test_rope_inv_freq_bit_identical_to_hf(head_dim, scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_theta": 500000.0, **(scaling or {"rope_type": "default"})}
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_parameters=params)
    if scaling is None:
        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    ours = rope_inv_freq(head_dim, 500000.0, scaling)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, expected), f"max diff {(ours - expected).abs().max().item():.3e}"


def test_rope_rejects_bad_inputs(device):
    q, k = torch.zeros(1, 4, 2, 8, device=device), torch.zeros(1, 4, 1, 8, device=device)
    pos, inv_freq = torch.arange(4, device=device)[None], torch.ones(4, device=device)
    with pytest.raises(ValueError, match="position_ids"):
        apply_rope(q, k, pos[:, :3], inv_freq)
    with pytest.raises(ValueError, match="inv_freq"):
        apply_rope(q, k, pos, torch.ones(8, device=device))
    with pytest.raises(ValueError, match="k "):
        apply_rope(q, k[..., :6], pos, inv_freq)
    with pytest.raises(ValueError, match="rope_type"):
        rope_inv_freq(8, 10000.0, {"rope_type": "yarn", "factor": 2.0})
