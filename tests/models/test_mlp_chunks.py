"""MLP token chunks (`models.mlp_chunks`, ``LlamaMLP.chunk_tokens``, ``model.mlp_chunk_tokens``).

A tiny GQA model with LoRA on every linear (B ≠ 0 so that A has gradients), dense and QLoRA, on
rows of N = 37 tokens (and 2 rows of 19, packed documents) in chunks of C = 10, which divides
neither:

* without dropout, the loss and every LoRA gradient equal the unchunked ones (fp32 table) with
  no checkpointing, plain checkpointing and offload, on the CPU reference path and on the kernel
  path (Triton interpreter, NF4: the dequantizations per weight are counted);
* with dropout the masks are drawn per chunk (the reference draws ``torch.rand`` over each
  chunk's rows), so they are not the unchunked ones; what must hold is the replay: checkpointed
  chunks give the gradients of the same chunks differentiated by plain autograd, the three modes
  agree with each other, a rerun with the same seed is identical;
* no tensor with I or 2I columns created in the step (forward, loss, backward, recompute) has
  more than C rows, where the unchunked step makes N-row ones;
* off by default, in eval and for at most C tokens: the MLP in one piece.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from engine.adapters import adapter_params
from kernels.backend import set_kernel_mode
from kernels.linear_cross_entropy import linear_cross_entropy
from models.attention import DocumentLayout
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from tests.nf4_counting import counting_dequantizations
from tests.lora_models import tiny_lora_model
from tests.tolerances import assert_close

V, H, I = 101, 8, 40  # H < C: no weight has as many rows as a chunk
C = 10
SHAPES = {"row": (1, 37), "packed": (2, 19)}  # (B, T): N = 37, 38
MODES = ("none", "checkpoint", "offload")


def tiny_model(quant: str, dropout: float) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5)
    return tiny_lora_model(cfg, quant, dropout)


def step(model: LlamaForCausalLM, mode: str, chunk: int | None, shape: str = "row", seed: int = 123):
    """Forward, Σ CE, backward, dropout from ``seed``: (loss, LoRA gradients, CPU RNG state after)."""
    model.gradient_checkpointing = mode == "checkpoint"
    model.offload_activations = mode == "offload"
    model.mlp_chunk_tokens = chunk
    model.zero_grad()
    B, T = SHAPES[shape]
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    inputs = {"segment_ids": DocumentLayout.from_lengths([[7, 12]] * B)} if shape == "packed" else {}
    torch.manual_seed(seed)
    h = model.hidden_states(ids, **inputs)
    loss = linear_cross_entropy(h.reshape(-1, H), model.lm_head.weight, ids.roll(-1, 1).reshape(-1), reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter_params(model).items()}, torch.get_rng_state()


def assert_same_step(actual, expected, what: str) -> None:
    assert_close(actual[0], expected[0], torch.float32, f"{what}: loss")
    for name, grad in expected[1].items():
        assert_close(actual[1][name], grad, torch.float32, f"{what}: grad {name}")


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_chunks_equal_the_unchunked_mlp_without_dropout(quant, shape):
    model = tiny_model(quant, dropout=0.0)
    expected = step(model, "none", None, shape)
    assert all(g.abs().sum() > 0 for g in expected[1].values()), "every LoRA weight must get a gradient"
    for mode in MODES:
        assert_same_step(step(model, mode, C, shape), expected, f"{mode}, chunks of {C}")


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_dropout_masks_are_replayed_in_every_mode(quant):
    """Chunked with dropout: the modes agree (the chunks nest in the block's checkpoint and in
    the offloaded recompute; the replay itself is the next test's) and leave the RNG where the
    others do; a rerun is identical; the masks are really drawn (another seed, other gradients;
    unchunked, other gradients too)."""
    model = tiny_model(quant, dropout=0.1)
    runs = {mode: step(model, mode, C) for mode in MODES}
    for mode in ("checkpoint", "offload"):
        assert_same_step(runs[mode], runs["none"], f"{mode} against no checkpointing")
        assert torch.equal(runs[mode][2], runs["none"][2]), f"{mode}: the recompute moved the global RNG"
    again = step(model, "checkpoint", C)
    assert torch.equal(again[0], runs["checkpoint"][0])
    assert all(torch.equal(again[1][n], g) for n, g in runs["checkpoint"][1].items()), "a rerun differs"
    name = "model.layers.0.mlp.gate_proj.lora_A"
    for other in (step(model, "none", C, seed=124), step(model, "none", None)):
        assert (other[1][name] - runs["none"][1][name]).abs().max() > 1e-3


@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_checkpointed_chunks_have_the_gradients_of_plain_chunks(kernels):
    """One MLP with dropout: the chunks under their checkpoints against the same chunks run one
    after the other by plain autograd (the same draws in the same order, the forward's own masks
    in the backward): the output, ∂x and every LoRA gradient agree. Reference path and kernels."""
    model = tiny_model("nf4", dropout=0.1)
    mlp = model.model.layers[1].mlp
    x = torch.randn(2, 19, H)
    dy = torch.randn(2, 19, H)
    results = []
    with set_kernel_mode(kernels):
        for chunked in (True, False):
            mlp.zero_grad()
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(5)
            if chunked:
                mlp.chunk_tokens = C
                y = mlp(xi)
            else:
                mlp.chunk_tokens = None
                y = torch.cat([mlp(part) for part in xi.reshape(-1, H).split(C)]).view_as(xi)
            y.backward(dy)
            results.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in mlp.named_parameters()
                                                  if p.requires_grad}))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results
    assert_close(y, y_ref, torch.float32, "output")
    assert_close(dx, dx_ref, torch.float32, "dx")
    for name, grad in grads_ref.items():
        assert_close(grads[name], grad, torch.float32, f"grad {name}")


def test_kernel_path_chunks_equal_and_dequantize_per_chunk(monkeypatch):
    """Triton kernels (the interpreter here), QLoRA, plain checkpointing: chunks equal the
    unchunked step; each MLP weight is dequantized 3·K − 1 times (K = 4 chunks: forward, the
    block's recompute, which stops before the last chunk, each chunk's recompute), the attention
    weights still twice."""
    model = tiny_model("nf4", dropout=0.0)
    with set_kernel_mode("triton"):
        expected = step(model, "checkpoint", None)
        calls = counting_dequantizations(monkeypatch)
        chunked = step(model, "checkpoint", C)
    assert_same_step(chunked, expected, "kernel path")
    chunks = -(-37 // C)
    for name, module in model.named_modules():
        if name.endswith("_proj") and hasattr(module, "base"):
            want = 3 * chunks - 1 if ".mlp." in name else 2
            assert calls[module.base.weight_nf4.packed.data_ptr()] == want, f"{name}: {calls}"


class WidestRows(TorchDispatchMode):
    """The most rows (numel / last dimension) of any tensor an op creates whose last dimension is
    I or 2I (act, [gate | up] and their gradients; the weights have H rows): views of an input
    allocate nothing and are not counted."""

    def __init__(self):
        super().__init__()
        self.rows, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in (I, 2 * I)
                    and t.untyped_storage().data_ptr() not in inputs and t.numel() // t.shape[-1] > self.rows):
                self.rows, self.op = t.numel() // t.shape[-1], f"{func} -> {tuple(t.shape)}"
        return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_no_mlp_tensor_has_more_rows_than_a_chunk(quant, mode):
    model = tiny_model(quant, dropout=0.1)
    for chunk, rows in ((None, 38), (C, C)):
        with WidestRows() as rec:
            step(model, mode, chunk, "packed")
        assert rec.rows == rows, f"chunk {chunk}: the widest MLP tensor has {rec.rows} rows ({rec.op}), expected {rows}"


def test_one_piece_by_default_in_eval_and_for_few_tokens():
    model = tiny_model("none", dropout=0.1)
    mlp = model.model.layers[0].mlp
    assert model.mlp_chunk_tokens is None and mlp.chunk_tokens is None
    x = torch.randn(1, 37, H)
    for chunk, training in ((37, True), (C, False)):
        mlp.chunk_tokens = None
        mlp.train(training)
        torch.manual_seed(3)
        expected = mlp(x)
        mlp.chunk_tokens = chunk
        torch.manual_seed(3)
        assert torch.equal(mlp(x), expected), f"chunk {chunk}, training {training}: not the one-piece MLP"


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_the_setter_takes_none_or_a_positive_whole_number(bad):
    model = tiny_model("none", dropout=0.0)
    model.mlp_chunk_tokens = 16
    assert all(layer.mlp.chunk_tokens == 16 for layer in model.model.layers) and model.mlp_chunk_tokens == 16
    with pytest.raises(ValueError, match="mlp_chunk_tokens"):
        model.mlp_chunk_tokens = bad
    model.mlp_chunk_tokens = None
    assert all(layer.mlp.chunk_tokens is None for layer in model.model.layers)
