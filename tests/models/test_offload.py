"""Activation offload (`models.offload`): checkpointing with the block inputs held in CPU memory.

On a tiny GQA model with LoRA (dropout > 0, so the recompute must replay the RNG) and QLoRA: the
loss and every LoRA gradient equal those of plain checkpointing and of no checkpointing (fp32
table), for plain, padded and packed batches; between forward and backward each block's input
lives in the stash as a CPU copy; NF4 weights are dequantized twice per step (kernel path).
On this machine the "offload" is a CPU-to-CPU copy; the CUDA test (pinned memory, side stream,
prefetch) runs only where a GPU is present.
"""

from __future__ import annotations


import pytest
import torch

from engine.adapters import adapter_params
from kernels.backend import set_kernel_mode
from kernels.linear_cross_entropy import linear_cross_entropy
from models.attention import DocumentLayout
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.offload import HostStash
from tests.nf4_counting import counting_dequantizations
from tests.lora_models import tiny_lora_model
from tests.tolerances import assert_close

V, T = 101, 24
MODES = ("none", "checkpoint", "offload")
LENGTHS = [7, 12, 5]  # documents of the packed row; T = 24


def tiny_model(quant: str, dropout: float = 0.1, device: str = "cpu") -> LlamaForCausalLM:
    """3 blocks, GQA 4/2, LoRA r=4 on every linear (B ≠ 0 so that A has gradients)."""
    cfg = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=77, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    return tiny_lora_model(cfg, quant, dropout).to(device)


def set_mode(model: LlamaForCausalLM, mode: str) -> None:
    model.gradient_checkpointing = mode == "checkpoint"
    model.offload_activations = mode == "offload"


def batch_inputs(kind: str, B: int) -> dict:
    if kind == "padded":
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, 17:] = 0
        return {"attention_mask": mask}
    if kind == "segment_ids":
        return {"segment_ids": torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS)).expand(B, T)}
    if kind == "layout":
        return {"segment_ids": DocumentLayout.from_lengths([LENGTHS] * B)}
    return {}


def ids_and_labels(B: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    return ids.to(device), ids.roll(-1, dims=1).to(device)


def step(model: LlamaForCausalLM, mode: str, inputs: dict, B: int = 2, device: str = "cpu"):
    """Forward, Σ CE over every position, backward with dropout from a fixed seed. Returns the
    loss, the LoRA gradients and the CPU RNG state after the step."""
    set_mode(model, mode)
    model.zero_grad()
    ids, labels = ids_and_labels(B, device)
    torch.manual_seed(123)
    h = model.hidden_states(ids, **inputs)
    loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, labels.reshape(-1),
                                reduction="sum")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter_params(model).items()}, torch.get_rng_state()


@pytest.mark.parametrize("kind", ["plain", "padded", "segment_ids", "layout"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_offload_equals_checkpointing_and_no_checkpointing(quant, kind):
    model = tiny_model(quant)
    runs = {mode: step(model, mode, batch_inputs(kind, 2)) for mode in MODES}
    loss, grads, rng = runs["none"]
    assert all(g.abs().sum() > 0 for g in grads.values()), "every LoRA weight must get a gradient"
    for mode in ("checkpoint", "offload"):
        other_loss, other_grads, other_rng = runs[mode]
        assert_close(other_loss, loss, torch.float32, f"{mode}: loss")
        for name in grads:
            assert_close(other_grads[name], grads[name], torch.float32, f"{mode}: grad {name}")
        assert torch.equal(other_rng, rng), f"{mode}: the recompute moved the global RNG"


def test_dropout_makes_the_rng_replay_matter():
    """The equality above is not vacuous: another dropout draw gives other LoRA gradients."""
    model = tiny_model("none")
    _, grads, _ = step(model, "offload", {})
    set_mode(model, "offload")
    model.zero_grad()
    ids, labels = ids_and_labels(2)
    torch.manual_seed(124)
    h = model.hidden_states(ids)
    linear_cross_entropy(h.reshape(-1, 48), model.lm_head.weight, labels.reshape(-1), reduction="sum").backward()
    name = "model.layers.0.self_attn.q_proj.lora_A"
    assert (adapter_params(model)[name].grad - grads[name]).abs().max() > 1e-3


def offload_nodes(loss: torch.Tensor) -> list:
    """The backward nodes of `_OffloadedBlock` reachable from ``loss`` (a custom Function's node
    is its ctx: it carries the stash and the index)."""
    seen, todo, found = set(), [loss.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_OffloadedBlockBackward":
            found.append(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return sorted(found, key=lambda n: n.index)


def test_block_inputs_wait_in_the_stash_as_cpu_copies():
    """Between forward and backward: one stash entry per block, a CPU copy (not a view) equal to
    the block's input; the backward brings each back and releases it."""
    model = tiny_model("none")
    set_mode(model, "offload")
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().clone()))
             for layer in model.model.layers]
    ids, labels = ids_and_labels(2)
    h = model.hidden_states(ids)
    for hook in hooks:
        hook.remove()
    loss = linear_cross_entropy(h.reshape(-1, 48), model.lm_head.weight, labels.reshape(-1), reduction="sum")
    nodes = offload_nodes(loss)
    assert [n.index for n in nodes] == [0, 1, 2]
    stash = nodes[0].stash
    assert isinstance(stash, HostStash) and all(n.stash is stash for n in nodes)
    for node, block_input in zip(nodes, inputs):
        saved = stash.host[node.index]
        assert saved.device.type == "cpu" and not saved.is_pinned()  # pinned only for a CUDA input
        assert saved.untyped_storage().data_ptr() != block_input.untyped_storage().data_ptr()
        assert torch.equal(saved, block_input)
    loss.backward()
    assert stash.host == [None, None, None]
    with pytest.raises(RuntimeError, match="ran twice"):
        stash.take(0)


def test_nf4_weights_are_dequantized_twice_per_step_on_the_kernel_path(monkeypatch):
    """Triton kernels (the interpreter here): forward + recompute, the backward reuses the
    recompute's copy (`keep_dequantized`); and the kernels' dropout seeds are replayed too."""
    model = tiny_model("nf4")
    with set_kernel_mode("triton"):
        reference = step(model, "checkpoint", batch_inputs("layout", 1), B=1)
        calls = counting_dequantizations(monkeypatch)
        offloaded = step(model, "offload", batch_inputs("layout", 1), B=1)
    assert len(calls) == 3 * 7 and set(calls.values()) == {2}, f"dequantizations per weight in one step: {calls}"
    assert_close(offloaded[0], reference[0], torch.float32, "loss")
    for name in reference[1]:
        assert_close(offloaded[1][name], reference[1][name], torch.float32, f"grad {name}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and copy streams need CUDA")
def test_cuda_offload_pins_the_inputs_and_frees_device_memory():
    """On a GPU: the stash is pinned host memory, the device holds less after the forward than
    with plain checkpointing, and loss and gradients are the same."""
    model = tiny_model("none", device="cuda")
    results, held = {}, {}
    for mode in ("checkpoint", "offload"):
        set_mode(model, mode)
        model.zero_grad()
        ids, labels = ids_and_labels(2, "cuda")
        torch.manual_seed(123)
        before = torch.cuda.memory_allocated()
        h = model.hidden_states(ids)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # frees the blocks whose release waited on the copy stream (record_stream)
        held[mode] = torch.cuda.memory_allocated() - before
        if mode == "offload":
            stash = offload_nodes(h.sum())[0].stash
            assert all(t.device.type == "cpu" and t.is_pinned() for t in stash.host)
        loss = linear_cross_entropy(h.reshape(-1, 48), model.lm_head.weight, labels.reshape(-1), reduction="sum")
        loss.backward()
        results[mode] = loss.detach(), {n: p.grad.clone() for n, p in adapter_params(model).items()}
    assert held["offload"] < held["checkpoint"], held
    assert_close(results["offload"][0], results["checkpoint"][0], torch.float32, "loss")
    for name, grad in results["checkpoint"][1].items():
        assert_close(results["offload"][1][name], grad, torch.float32, f"grad {name}")
