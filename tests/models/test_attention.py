"""Document-causal attention (`models.attention`) against the dense-mask SDPA definition, and the
model on packed / padded batches against each document run alone, without any (T × T) tensor.

Op level: outputs and the gradients of q, k, v, fp32 and bf16 (bf16 inputs, fp32 reference from
the same rounded inputs), mixed document lengths with length-1 documents, padding at the end,
GQA and MHA, sliding windows shorter and longer than the documents. The CUDA path (FlexAttention)
cannot run backward on a CPU: its mask_mod is checked on index grids, its forward eagerly, and its
compiled forward's graphs over varying batch shapes under dynamo with the eager backend.

Model level (issue 9's acceptance): forward + backward of one packed row of 8 documents under a
TorchDispatchMode that records the largest tensor any op of the step creates (forward, loss and
backward): it must hold fewer elements than one T × T mask, and the hidden states and every LoRA
gradient must equal those of each document run alone (fp32 table).
"""

import warnings

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from engine.adapters import LoRAConfig, adapter_params, inject_lora, set_trainable
from kernels.linear_cross_entropy import linear_cross_entropy
from models import load_model
from models.attention import (
    DocumentLayout,
    block_mask_for,
    document_attention,
    document_attention_flex,
    document_attention_ref,
    document_attention_sdpa,
    document_mask_mod,
    document_mask_ref,
)
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM, build_attention_mask
from tests.tolerances import assert_close

# Two rows of T = 57: mixed documents with length-1 ones; 40 real tokens then 17 of padding.
ROW_DOCS = [1, 17, 1, 30, 8]
T_OP = sum(ROW_DOCS)


def op_layout() -> DocumentLayout:
    seg = torch.stack([torch.repeat_interleave(torch.arange(5), torch.tensor(ROW_DOCS)),
                       torch.tensor([0] * 40 + [1] * 17)])  # (2, T)
    mask = torch.ones(2, T_OP, dtype=torch.long)
    mask[1, 40:] = 0
    return DocumentLayout.from_batch(mask, seg)


def qkv(nh: int, nkv: int, dtype: torch.dtype, hd: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(2, h, T_OP, hd, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(nh), make(nkv), make(nkv), torch.randn(2, nh, T_OP, hd, generator=g).to(dtype)


def test_layout_from_batch_and_from_lengths_agree():
    layout = op_layout()
    assert layout.host_lengths() == [ROW_DOCS, [40, 17]]
    other = DocumentLayout.from_lengths([ROW_DOCS, [40, 17]])
    assert torch.equal(other.doc_ids, layout.doc_ids)
    want = torch.cat([torch.arange(n) for n in ROW_DOCS])
    assert torch.equal(layout.positions()[0], want)
    with pytest.raises(ValueError, match="sum to the same T"):
        DocumentLayout.from_lengths([[3, 4], [5]])


HEADS = {"gqa": (6, 2), "mha": (4, 4)}
WINDOWS = {"no-window": None, "window-4": 4, "window-11": 11, "window-100": 100}  # 100 > every document


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", list(WINDOWS.values()), ids=list(WINDOWS))
@pytest.mark.parametrize("heads", list(HEADS.values()), ids=list(HEADS))
@pytest.mark.parametrize("chunk", [None, 8], ids=["chunk-default", "chunk-8"])
def test_document_attention_equals_dense_reference(heads, window, dtype, chunk):
    """chunk 8 < window 11: a band reaches back over two earlier key chunks."""
    layout = op_layout()
    q, k, v, dy = qkv(*heads, dtype)
    kwargs = {} if chunk is None else {"window_chunk": chunk}
    attend = document_attention_sdpa if chunk else document_attention
    y = attend(q, k, v, layout, window, **kwargs)
    got = torch.autograd.grad(y, (q, k, v), dy)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want_y = document_attention_ref(q32, k32, v32, layout, window)
    want = torch.autograd.grad(want_y, (q32, k32, v32), dy.float())
    assert y.dtype == dtype
    assert_close(y, want_y, dtype, name="y")
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, dtype, name=f"d{name}")


def test_reference_is_the_mask_of_models_llama():
    """The dense definition here is the packed/padded mask the model used before (real queries)."""
    layout = op_layout()
    seg = torch.stack([torch.repeat_interleave(torch.arange(5), torch.tensor(ROW_DOCS)),
                       torch.zeros(T_OP, dtype=torch.long)])
    real = torch.ones(2, T_OP, dtype=torch.bool)
    real[1, 40:] = False
    for window in (None, 4):
        old = build_attention_mask(real, seg, window, 0, T_OP, torch.device("cpu")).allowed[:, 0]
        new = document_mask_ref(layout, window)
        assert torch.equal(new[real], old[real])


def test_left_padding_is_a_document_of_its_own():
    """Padding before the real tokens (no segment ids): real queries never see a pad key."""
    real = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    layout = DocumentLayout.from_batch(real, None)
    assert layout.host_lengths() == [[3, 4], [7]]
    old = build_attention_mask(real, None, None, 0, 7, torch.device("cpu")).allowed[:, 0]
    assert torch.equal(document_mask_ref(layout)[real.bool()], old[real.bool()])


@pytest.mark.parametrize("window", [None, 4], ids=["no-window", "window-4"])
def test_flex_mask_mod_and_forward_on_cpu(window):
    """The CUDA path's pieces that run on a CPU: mask_mod on the index grid, eager forward."""
    from torch.nn.attention.flex_attention import create_mask

    layout = op_layout()
    grid = create_mask(document_mask_mod(layout.doc_ids, layout.positions(), 0, window), 2, 1, T_OP, T_OP,
                       device="cpu")[:, 0]
    assert torch.equal(grid, document_mask_ref(layout, window))
    q, k, v, _ = qkv(6, 2, torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    with warnings.catch_warnings():  # eager flex warns (once) that it is not the fused kernel
        warnings.simplefilter("ignore", UserWarning)
        y = document_attention_flex(q, k, v, layout, window, compiled=False)
    assert_close(y, document_attention_ref(q, k, v, layout, window), name="flex y")
    assert block_mask_for(layout, window, compiled=False) is block_mask_for(layout, window, compiled=False)


# Kinds of packed batch (dynamo compiles one graph per kind, not per shape): B 1 or more; T within
# one 128-block, within one with the prefix's 6 keys a block more, or several blocks; prefix or not.
WARM_UP = [(B, T) for B in (1, 3) for T in (40, 125, 300)]
NEW_LENGTHS = [(1, 77), (1, 124), (1, 1000), (2, 127), (4, 256)]


def test_compiled_flex_compiles_per_kind_of_batch_not_per_shape():
    """On CUDA every packed batch has its own shape. The compiled functions (`compile_flex`: the
    engine's wrapper, here with dynamo's eager backend, since guards and recompiles, the part
    that decides this, are the same for every backend) compile one graph per kind of batch: after
    each kind has run once as a prefix-tuned DPO run meets it (the policy with its prefix, trained
    and evaluated; the base reference without, under no_grad: grad mode is guarded too), new
    lengths compile nothing. The mix needs more graphs than dynamo's default limit of 8, past
    which a call runs eager FlexAttention with (T × T) scores; under `RECOMPILE_LIMIT` none does
    (``fail_on_recompile_limit_hit`` would raise). Every output equals the reference."""
    import models.attention as attention
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from tests.models.test_prefix_attention import prefix_attention_ref

    def run(B, T):
        g = torch.Generator().manual_seed(T)
        layout = DocumentLayout.from_lengths([[T // 3, T - T // 3]] * B)
        q, k, v = (torch.randn(B, h, T, 16, generator=g) for h in (4, 2, 2))
        pk, pv = (torch.randn(1, 2, 6, 16, generator=g) for _ in range(2))
        with torch.no_grad():  # the base reference, and the policy evaluated
            y = document_attention_flex(q, k, v, layout, compiled=True)
            y_eval = document_attention_flex(q, k, v, layout, compiled=True, prefix=(pk, pv))
        y_train = document_attention_flex(q, k, v, layout, compiled=True, prefix=(pk, pv))
        assert_close(y, document_attention_sdpa(q, k, v, layout), name=f"compiled flex y {B} x {T}")
        want = prefix_attention_ref(q, k, v, pk, pv, layout.doc_ids, None)
        for got in (y_eval, y_train):
            assert_close(got, want, torch.float32, name=f"compiled flex y, prefix, {B} x {T}")

    def graphs():
        return [len(_debug_get_cache_entry_list(fn.__code__)) for fn in (flex_attention, create_block_mask)]

    torch._dynamo.reset()
    saved = dict(attention._COMPILED)
    attention._COMPILED.update(flex=attention.compile_flex(flex_attention, "eager"),
                               block_mask=attention.compile_flex(create_block_mask, "eager"))
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for B, T in WARM_UP:
                run(B, T)
            warm = graphs()
            for B, T in NEW_LENGTHS:
                run(B, T)
        assert graphs() == warm, "a new batch length recompiled"
        assert torch._dynamo.config.recompile_limit < max(warm) <= attention.RECOMPILE_LIMIT, warm
    finally:
        attention._COMPILED.clear()
        attention._COMPILED.update(saved)
        torch._dynamo.reset()


# ---- Model level --------------------------------------------------------------------------------

def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) that any op run under it creates: outputs that are
    views of an input (``t()`` of the head weight, slices) allocate nothing and are not counted."""

    def __init__(self):
        super().__init__()
        self.numel, self.op, self.ops = 0, None, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        inputs = _storages((args, kwargs))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() > self.numel
                    and t.untyped_storage().data_ptr() not in inputs):
                self.numel, self.op = t.numel(), f"{func} -> {tuple(t.shape)}"
        return out


def test_recorder_sees_a_dense_mask():
    """The recorder can fail: today's packed mask is one T × T tensor."""
    seg = torch.repeat_interleave(torch.arange(2), torch.tensor([20, 44]))[None]
    with LargestTensor() as rec:
        build_attention_mask(None, seg, None, 0, 64, torch.device("cpu"))
    assert rec.numel >= 64 * 64


def with_lora(model: LlamaForCausalLM, seed: int = 0) -> LlamaForCausalLM:
    """LoRA as the engine injects it (engine/run/model.py), dropout 0 and B ≠ 0 so that A has gradients."""
    torch.manual_seed(seed)
    inject_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    set_trainable(model)
    with torch.no_grad():
        for name, p in adapter_params(model).items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    return model.train()


def step(model, ids, loss_at, **inputs):
    """Forward, loss Σ CE(next token) over the positions ``loss_at`` (a (T,) bool, row 0), backward.
    Returns the hidden states (T, H), the loss, and the LoRA gradients."""
    model.zero_grad()
    h = model.hidden_states(ids, **inputs)[0]  # (T, H)
    labels = torch.where(loss_at, ids[0].roll(-1), -100)
    loss = linear_cross_entropy(h[loss_at], model.lm_head.weight, labels[loss_at], reduction="sum")
    loss.backward()
    return h.detach(), loss.detach(), {n: p.grad.clone() for n, p in adapter_params(model).items()}


def check_packed_row(model, lengths: list[int], loss_every: int, vocab: int):
    """One packed row of documents vs each document alone; no tensor of the packed step ≥ T²."""
    T = sum(lengths)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, T), generator=g)
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]  # (1, T)
    loss_at = torch.arange(T) % loss_every == loss_every - 1
    ends = torch.tensor(lengths).cumsum(0)
    loss_at[ends - 1] = False  # a document's last token has no next token inside it
    with LargestTensor() as rec:
        h, loss, grads = step(model, ids, loss_at, segment_ids=segment_ids)
    assert "aten._scaled_dot_product_flash_attention_for_cpu_backward.default" in rec.ops, "backward not recorded"
    assert rec.numel < T * T, f"a tensor of {rec.numel} elements >= T² = {T * T}: {rec.op}"
    want_h, want_loss, want_grads = [], 0.0, {n: torch.zeros_like(p) for n, p in grads.items()}
    for start, end in zip((ends - torch.tensor(lengths)).tolist(), ends.tolist()):
        h_doc, loss_doc, grads_doc = step(model, ids[:, start:end], loss_at[start:end])
        want_h.append(h_doc)
        want_loss += loss_doc
        for n in grads:
            want_grads[n] += grads_doc[n]
    assert_close(h, torch.cat(want_h), name="packed hidden states")
    assert_close(loss, want_loss, name="loss")
    for n in grads:
        assert_close(grads[n], want_grads[n], name=f"grad {n}")


SMOLLM2_LAYERS = 2  # of the real 30: 4,096 tokens through all 30 cost minutes on 2 shared cores


def test_packed_row_smollm2_4096_tokens(smollm2_dir):
    """Real weights (first layers), 8 documents of mixed lengths in 4,096 tokens; the loss on every
    16th position keeps the CPU reference head's logits chunk (256 × 49,152) under T²."""
    model = load_model(smollm2_dir, dtype=torch.float32, device="cpu")
    model.model.layers = model.model.layers[:SMOLLM2_LAYERS]
    check_packed_row(with_lora(model), [1, 700, 37, 1200, 400, 1, 958, 799], loss_every=16,
                     vocab=model.config.vocab_size)


def tiny_gqa(**changes) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, **changes)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def test_packed_row_tiny_gqa_16384_tokens():
    lengths = [1, 3000, 517, 4096, 1, 2500, 3269, 3000]
    assert sum(lengths) == 16_384
    check_packed_row(with_lora(tiny_gqa()), lengths, loss_every=16, vocab=96)


def test_packed_row_tiny_gqa_sliding_window():
    """Mistral's window (300) shorter than most documents: the banded path, several chunks each."""
    lengths = [1, 750, 129, 1024, 1, 625, 817, 749]
    check_packed_row(with_lora(tiny_gqa(sliding_window=300)), lengths, loss_every=16, vocab=96)


@pytest.mark.parametrize("as_layout", [False, True], ids=["attention_mask", "DocumentLayout"])
def test_padded_batch_equals_rows_alone(as_layout):
    """Right-padded rows: the same loss and LoRA gradients as each row alone without padding;
    a host-built `DocumentLayout` (no device read) gives the same as the attention_mask."""
    model = with_lora(tiny_gqa())
    lengths, T = [29, 1, 12], 29
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 96, (3, T), generator=g)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()  # (3, T)
    labels = torch.where(mask.bool(), ids.roll(-1, 1), -100)
    labels[:, -1] = -100
    for b, n in enumerate(lengths):
        labels[b, n - 1] = -100

    def loss_and_grads(ids, labels, **inputs):
        model.zero_grad()
        h = model.hidden_states(ids, **inputs)
        loss = linear_cross_entropy(h.flatten(0, 1), model.lm_head.weight, labels.flatten(), reduction="sum")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in adapter_params(model).items()}

    inputs = ({"segment_ids": DocumentLayout.from_lengths([[n, T - n] if n < T else [T] for n in lengths])}
              if as_layout else {"attention_mask": mask})
    loss, grads = loss_and_grads(ids, labels, **inputs)
    alone = [loss_and_grads(ids[b:b + 1, :n], labels[b:b + 1, :n]) for b, n in enumerate(lengths)]
    assert_close(loss, sum(a[0] for a in alone), name="padded loss")
    for n in grads:
        assert_close(grads[n], sum(a[1][n] for a in alone), name=f"grad {n}")
