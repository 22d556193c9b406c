"""The parts of one LoRA / QLoRA training step's peak memory, by formula: what `tools.memory_plan`
prints. Every function gives bytes; shapes: N tokens per micro-batch (B rows of T), H hidden,
I intermediate, nh / nkv query / key-value heads, hd head dim, V vocabulary, L blocks, r the
LoRA rank, e the bytes of the compute dtype.

The step's peak is

    fixed  = base weights + embeddings/head/norms + LoRA (params, grads, AdamW's two moments)
    stored = what waits for the backward: with checkpointing L block inputs N·H·e (none on the
             device with offload: they are in host memory), without it L · saved_per_block
    peak   = fixed + stored + max(loss phase, block-backward phase) + overhead

where the loss phase is the final norm's input and output plus the loss's working set, and the
block-backward phase the recomputed block's saved tensors (with checkpointing) plus its backward's
gradients. With MLP chunks of C tokens (``Setup.mlp_chunk``, `models.mlp_chunks`) the MLP's
saved tensors and its SwiGLU backward are those of one chunk (`mlp_chunk_saved`), in the
block-backward phase, and no block keeps MLP tensors for its backward. Which tensors the ops save is enumerated per code path below, as the code of
kernels/ and models/ does it; `tests/tools/test_memory_plan.py` checks both enumerations against
what autograd really saves on a small block.

* ``kernel`` path (CUDA: the Triton ops' autograd Functions, FlexAttention), `saved_kernel_path`.
* ``reference`` path (CPU: the plain-torch references differentiated by autograd, per-document
  SDPA), `saved_reference_path`; the loss is the reference's (N, V) fp32 logits.

On G GPUs (``Setup.gpus``, ``Setup.strategy``) the peak is per GPU, N the tokens of one rank's
micro-batch; stored and transient parts are those of one GPU. Only ``fixed`` changes
(`parallel_parts`): DDP keeps the whole model on every rank plus its gradient buckets; FSDP2
shards every tensor 1/G and adds the all-gathered blocks in flight.

The frozen base (``Setup.quant``, `models.quantized`): dense, NF4 or int8 — both dequantized to
the compute dtype for each product, so their dense copies enter the plan the same way (`DEQUANTIZED`)
— or FP8, whose products run on the e4m3 codes: no dense copy, but per product the working set of
`fp8_transient` (modelled from the code of `kernels.fp8_linear`, not measured).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

from engine.adapters.lora import LLAMA_LINEARS as LINEARS
from engine.errors import InputError
from kernels.fp8_rows import ROW_CHUNK_ELEMENTS
from kernels.linear_cross_entropy import _chunk_rows
from kernels.nf4 import NESTED_BLOCKSIZE, NF4_VALUES, dynamic_map, nf4_bytes, quantize_nf4
from models.config import LlamaConfig
from models.quantized import FORMATS, quantized_bytes

NF4_BLOCKSIZE = inspect.signature(quantize_nf4).parameters["blocksize"].default  # what --quant nf4 uses
FP32 = 4
# Stated constants, not derived: the CUDA context with cuBLAS / Triton workspaces and modules
# (0.5-1 GiB on recent GPUs), the caching allocator's fragmentation as a fraction of the tensor
# peak, and a CPU run's memory besides the model (tokenizer, tokenized data, torch's lazily
# started CPU kernels: what a run's RSS gains before its model loads, ~90-110 MB measured).
CUDA_CONTEXT_BYTES = 1 << 30
CUDA_ALLOCATOR_SLACK = 0.05
CPU_RUN_OVERHEAD_BYTES = 100 << 20
STRATEGIES = ("single", "ddp", "fsdp")
QUANTS = ("none", *FORMATS)
# Formats dequantized to the compute dtype for each product (`kernels.frozen.base_product`): the
# dense copy is a transient, kept for the backward under `kernels.nf4.keep_dequantized` and saved
# by the reference path's x·Wᵀ. FP8 has none: its products run on the e4m3 codes (`fp8_transient`).
DEQUANTIZED = ("nf4", "int8")


@dataclass(frozen=True)
class Setup:
    """One training configuration: model, batch geometry, quantisation, adapter, flags, device."""

    cfg: LlamaConfig
    tokens: int  # N, tokens per micro-batch
    batch_size: int = 1  # B rows of N / B tokens
    quant: str = "none"  # or "nf4", "int8", "fp8" (QUANTS)
    dtype_bytes: int = 2  # e
    lora_rank: int = 16
    targets: tuple[str, ...] = LINEARS
    lora_dropout: float = 0.05
    checkpointing: bool = True
    offload: bool = False
    mlp_chunk: int | None = None  # C, tokens per MLP chunk (models.mlp_chunks); None: off
    device: str = "cuda"  # "cuda": kernel path; "cpu": reference path
    gpus: int = 1  # G ranks, each with its own micro-batch of N tokens
    strategy: str = "single"  # "ddp" or "fsdp" (FSDP2) on G ranks

    def __post_init__(self):
        if self.quant not in QUANTS:
            raise InputError(f"quant {self.quant!r}: expected one of {', '.join(QUANTS)}")
        if self.strategy not in STRATEGIES or self.gpus < 1:
            raise InputError(f"strategy {self.strategy!r} on {self.gpus} GPUs: expected one of "
                             f"{', '.join(STRATEGIES)} on at least 1")
        if self.gpus > 1 and self.strategy == "single":
            raise InputError(f"--gpus {self.gpus}: more than one GPU needs --strategy ddp or fsdp")
        if self.strategy != "single" and self.device != "cuda":
            raise InputError(f"--strategy {self.strategy}: modelled on the CUDA path only (--device cuda)")

    @property
    def kernel_path(self) -> bool:
        return self.device == "cuda"

    @property
    def chunked(self) -> bool:
        """Whether the MLP runs in chunks: as `models.llama.LlamaMLP`, when N > C."""
        return self.mlp_chunk is not None and self.tokens > self.mlp_chunk


@dataclass
class Plan:
    """The parts (name -> bytes, with a note on the formula) and the predicted peak."""

    parts: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    host_bytes: int = 0  # host memory holding offloaded block inputs (not part of the device peak)

    def add(self, name: str, nbytes: int, note: str) -> None:
        self.parts[name], self.notes[name] = int(nbytes), note

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


def linear_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder linear: q (nh·hd, H), k and v (nkv·hd, H), o (H, nh·hd),
    gate and up (I, H), down (H, I)."""
    H, I, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q),
            "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}


def base_weight_bytes(s: Setup) -> int:
    """L · Σ over the 7 decoder linears of out·in·e (dense) or `models.quantized.quantized_bytes`:
    `nf4_bytes`(out·in) (QLoRA), out·in + 4·out (int8, fp8: a byte per weight, an fp32 scale per row)."""
    per_block = sum(quantized_bytes(s.quant, o, i) if s.quant != "none" else o * i * s.dtype_bytes
                    for o, i in linear_shapes(s.cfg).values())
    return s.cfg.num_hidden_layers * per_block


def embedding_bytes(s: Setup) -> int:
    """Embedding V·H·e, the head V·H·e unless tied, and the 2L + 1 norm weights H·e."""
    cfg = s.cfg
    heads = 1 if cfg.tie_word_embeddings else 2
    return (heads * cfg.vocab_size + (2 * cfg.num_hidden_layers + 1)) * cfg.hidden_size * s.dtype_bytes


def lora_param_count(s: Setup) -> int:
    """L · Σ over targeted linears of r·(in + out)."""
    shapes = linear_shapes(s.cfg)
    return s.cfg.num_hidden_layers * sum(s.lora_rank * (o + i) for name, (o, i) in shapes.items() if name in s.targets)


def lora_bytes(s: Setup) -> int:
    """fp32 parameters, gradients and AdamW's exp_avg and exp_avg_sq: 4 · 4 bytes per parameter
    (the fused AdamW step allocates nothing of that size)."""
    return 4 * FP32 * lora_param_count(s)


def _groups(s: Setup) -> dict[str, bool]:
    """Whether each LoRA input is targeted: normed1 (q, k, v), attn (o), normed2 (gate, up), act (down)."""
    t = set(s.targets)
    return {"normed1": bool(t & {"q_proj", "k_proj", "v_proj"}), "attn": "o_proj" in t,
            "normed2": bool(t & {"gate_proj", "up_proj"}), "act": "down_proj" in t}


ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def _dense_weights(s: Setup, names: tuple[str, ...]) -> int:
    """The dequantized weights of those linears of one block, Σ out·in·e."""
    return sum(o * i for name, (o, i) in linear_shapes(s.cfg).items() if name in names) * s.dtype_bytes


def _targeted(s: Setup, names: tuple[str, ...]) -> int:
    return sum(name in s.targets for name in names)


def saved_kernel_path(s: Setup, keep_dequantized: bool) -> int:
    """What one block saves for its backward on the kernel path, bytes:

    e·N·(H block input [RMSNorm] + H residual h1 [RMSNorm]
         + (2·nh + 2·nkv)·hd  [attention: rotated q, k, v, output]
         + 2I                 [SwiGLU: gate, up]
         + per targeted LoRA input, once per group: H normed1, nh·hd attention output (the
           transpose-reshape copy), H normed2, I act)
    + 4·N·(2 rstd + nh logsumexp + r per LoRA linear h = drop(x)·Aᵀ)
    + the 7 dense weights when NF4 or int8 is kept dequantized (the recompute under
    checkpointing; FP8 keeps none).
    RoPE saves positions only; LoRA dropout saves its seed, not a mask.

    With MLP chunks the MLP's terms (2I, I act, its LoRA's r, its 3 dense weights) are saved by
    each chunk's recompute instead (`mlp_chunk_saved`), and the block keeps normed2 (H) for every
    token, the chunks' input, whether or not gate/up have LoRA.
    """
    cfg, N, e = s.cfg, s.tokens, s.dtype_bytes
    H, I, hd, nh, nkv = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads, \
        cfg.num_key_value_heads
    g = _groups(s)
    elements = 2 * H + (2 * nh + 2 * nkv) * hd + H * g["normed1"] + nh * hd * g["attn"]
    fp32 = 2 + nh + s.lora_rank * _targeted(s, ATTENTION_LINEARS)
    kept = s.quant in DEQUANTIZED and keep_dequantized
    dense = _dense_weights(s, ATTENTION_LINEARS) if kept else 0
    if s.chunked:
        elements += H
    else:
        elements += 2 * I + H * g["normed2"] + I * g["act"]
        fp32 += s.lora_rank * _targeted(s, MLP_LINEARS)
        dense += _dense_weights(s, MLP_LINEARS) if kept else 0
    return N * (e * elements + FP32 * fp32) + dense


def saved_reference_path(s: Setup) -> int:
    """What one block saves on the reference path (autograd through the plain-torch ops), bytes:

    e·N·(2H + 2  [each RMSNorm: its input and rstd; x·rstd·w saves only the frozen w]
         + 2hd   [RoPE's cos and sin, recomputed per block]
         + (2·nh + 2·nkv)·hd + nh  [SDPA flash: rotated q, k, v, output, logsumexp]
         + 4I    [SwiGLU: gate, σ(gate), gate·σ(gate), up]
         + r per LoRA linear [h]
         + per LoRA linear with dropout: in (drop(x)) + in/e (the bool keep mask),
           without dropout once per group: its input (H, nh·hd, H, I))
    + the 7 dense weights under NF4 or int8 (x·Wᵀ saves the dequantized W for ∂/∂x in every
    block; FP8's product, an autograd Function, saves none).
    The first block saves a little less (its input needs no gradient); not subtracted.

    With MLP chunks, as on the kernel path: the MLP's terms (4I, the r and dropout terms of
    gate, up, down, act, its 3 dense weights) go to `mlp_chunk_saved`; the block keeps normed2.
    """
    cfg, N, e = s.cfg, s.tokens, s.dtype_bytes
    H, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    g = _groups(s)
    elements = 2 * (H + 1) + 2 * hd + (2 * nh + 2 * nkv) * hd + nh + s.lora_rank * _targeted(s, ATTENTION_LINEARS)
    if s.lora_dropout > 0:
        bytes_per_token = _dropout_bytes(s, ATTENTION_LINEARS)
    else:
        bytes_per_token = e * (H * g["normed1"] + nh * hd * g["attn"])
    dense = _dense_weights(s, ATTENTION_LINEARS) if s.quant in DEQUANTIZED else 0
    if s.chunked:
        bytes_per_token += e * H
    else:
        bytes_per_token += _reference_mlp_bytes(s, with_input=True)
        dense += _dense_weights(s, MLP_LINEARS) if s.quant in DEQUANTIZED else 0
    return N * (e * elements + bytes_per_token) + dense


def _dropout_bytes(s: Setup, names: tuple[str, ...]) -> int:
    """Per token, reference path: drop(x) (in·e) and its bool keep mask (in) per targeted linear."""
    shapes = linear_shapes(s.cfg)
    return sum(shapes[name][1] * (s.dtype_bytes + 1) for name in names if name in s.targets)


def _reference_mlp_bytes(s: Setup, with_input: bool) -> int:
    """Per token, what the MLP saves on the reference path: e·(4I + r per LoRA linear) + the
    dropout terms of its LoRA linears, or without dropout their inputs normed2 (only
    ``with_input``: a chunk's input is the block's) and act."""
    cfg, e, g = s.cfg, s.dtype_bytes, _groups(s)
    own = e * (4 * cfg.intermediate_size + s.lora_rank * _targeted(s, MLP_LINEARS))
    if s.lora_dropout > 0:
        return own + _dropout_bytes(s, MLP_LINEARS)
    return own + e * (cfg.hidden_size * g["normed2"] * with_input + cfg.intermediate_size * g["act"])


def mlp_chunk_saved(s: Setup, rows: int) -> int:
    """What one MLP chunk of ``rows`` tokens saves in its recompute, for its backward, bytes:
    kernel path rows·(e·(2I [SwiGLU: gate, up] + I act if down has LoRA) + 4·r per MLP LoRA
    linear); reference path rows·`_reference_mlp_bytes` without the input (a view of the block's
    normed2); plus under NF4 or int8 the 3 dense MLP weights (the chunk's recompute runs under
    `kernels.nf4.keep_dequantized` on the kernel path; the reference's x·Wᵀ saves W anyway)."""
    cfg, e, g = s.cfg, s.dtype_bytes, _groups(s)
    if s.kernel_path:
        per_row = e * (2 + g["act"]) * cfg.intermediate_size + FP32 * s.lora_rank * _targeted(s, MLP_LINEARS)
    else:
        per_row = _reference_mlp_bytes(s, with_input=False)
    return rows * per_row + (_dense_weights(s, MLP_LINEARS) if s.quant in DEQUANTIZED else 0)


def saved_per_block(s: Setup, recompute: bool) -> int:
    """`saved_kernel_path` or `saved_reference_path` for the setup's device; ``recompute``: the
    block recomputed under checkpointing (NF4 / int8 weights kept dequantized on the kernel path)."""
    return saved_kernel_path(s, keep_dequantized=recompute) if s.kernel_path else saved_reference_path(s)


def block_backward_transient(s: Setup) -> int:
    """Gradients alive at the block backward's high point, the SwiGLU backward: ∂act, ∂gate, ∂up
    (3·N·I) while act (saved by down_proj) is already released, so +2·N·I·e on the kernel path;
    the reference's autograd keeps ∂ of gate·σ, σ and their sum too: +4·N·I·e; plus the incoming
    ∂h and the residual's accumulated gradient, 2·N·H·e; without checkpointing on NF4 or int8, one
    re-dequantized weight (the largest, I·H·e); on FP8 the largest product's working set
    (`fp8_transient`).

    With MLP chunks of C tokens the SwiGLU terms are C·I-sized, on top of the chunk's own saves
    (`mlp_chunk_saved`, its dense weights included), and the gradients of the chunk inputs wait,
    up to N·H·e, for the split's backward to concatenate them: 2 or 4 ·C·I·e + 3·N·H·e. (The
    chunk outputs' concatenation in the forward, 2·N·H·e with the chunks, happens in the
    recompute only without an outer checkpoint frame — with offload — and stays below that.)"""
    cfg, N, e = s.cfg, s.tokens, s.dtype_bytes
    I, H = cfg.intermediate_size, cfg.hidden_size
    swiglu = 2 if s.kernel_path else 4
    fp8 = fp8_transient(s) if s.quant == "fp8" else 0
    if s.chunked:
        return mlp_chunk_saved(s, s.mlp_chunk) + swiglu * s.mlp_chunk * I * e + 3 * N * H * e + fp8
    weight = I * H * e if s.quant in DEQUANTIZED and not s.checkpointing else 0
    return swiglu * N * I * e + 2 * N * H * e + weight + fp8


def fp8_transient(s: Setup) -> int:
    """The largest working set of one FP8 product (`kernels.fp8_linear`), over the 7 linears and
    both products, x·Wᵀ (k = in) and dY·W (k = out), on n rows (N, or C for the MLP's with chunks):

    * quantizing the operand per row (`kernels.fp8_rows.quantize_rows`): its e4m3 codes n·k and
      scales 4n; on the reference path also the fp32 scratch of one block of rows,
      ρ = min(n, ⌊`ROW_CHUNK_ELEMENTS` / k⌋): the rows in fp32 (dY ⊙ s_w, or x cast; divided and
      clamped in place) and their |·| for the row maximum, 2·4·ρ·k (the kernel path's Triton
      quantizer holds nothing but its outputs);
    * the product: the codes n·k and scales 4n, and on the kernel path, for dY·W, the transposed
      e4m3 copy of the weight that ``torch._scaled_mm`` reads, out·in (1 byte per weight); on the
      reference path (the fp32 emulation) the fp32 copies of both codes, 4·n·k + 4·out·in.
    * on the kernel path, the grouped forward of q/k/v and of gate/up (`kernels.lora_group`): x's
      codes and scales n·H + 4n beside the members' concatenated codes and scales, Σout·H + 4·Σout.
    The largest of these phases; one product at a time."""
    shapes = linear_shapes(s.cfg)
    worst = 0
    for name, (o, i) in shapes.items():
        n = s.mlp_chunk if s.chunked and name in MLP_LINEARS else s.tokens
        for k in (i, o):
            rows = min(n, max(1, ROW_CHUNK_ELEMENTS // k))
            quantize = n * k + FP32 * n + (0 if s.kernel_path else 2 * FP32 * rows * k)
            if s.kernel_path:
                product = n * k + FP32 * n + (o * i if k == o else 0)
            else:
                product = (1 + FP32) * n * k + FP32 * n + FP32 * o * i
            worst = max(worst, quantize, product)
    if s.kernel_path:
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            n = s.mlp_chunk if s.chunked and names[0] in MLP_LINEARS else s.tokens
            outs, k = sum(shapes[m][0] for m in names), shapes[names[0]][1]
            worst = max(worst, n * k + FP32 * n + outs * k + FP32 * outs)
    return worst


def loss_working_set(s: Setup) -> int:
    """The loss phase beyond what is stored: the final norm's saved input and the hidden states
    it returns (2·N·H·e + 4N), plus on the kernel path (fused linear + cross-entropy, a scalar
    loss) one chunk of C·V·e logits, C = `kernels.linear_cross_entropy._chunk_rows`, ∂h (N·H·e)
    and fp32 loss, lse and scale (12N); on the reference path the (N, V) fp32 logits' log-softmax
    (saved), its gradient and the logits' gradient (3·N·V·4) and ∂h (N·H·e); plus the hidden
    states' (N−B, H) copy without the last position when B > 1."""
    cfg, N, e, V = s.cfg, s.tokens, s.dtype_bytes, s.cfg.vocab_size
    H = cfg.hidden_size
    norm = 2 * N * H * e + FP32 * N
    if s.kernel_path:
        loss = _chunk_rows(N, V) * V * e + N * H * e + 3 * FP32 * N
    else:
        loss = 3 * N * V * FP32 + N * H * e
    copy = (N - s.batch_size) * H * e if s.batch_size > 1 else 0
    return norm + loss + copy


def linear_tensors(s: Setup, out: int, inp: int) -> list[tuple[int, int]]:
    """The frozen base tensors of one (out, in) linear as (dim-0 length, bytes per dim-0 row):
    dense [(out, in·e)]; int8 / fp8 the codes (out, in) of 1 byte and the row scales (out,) of 4;
    NF4 its 1-D buffers (`nf4_bytes`): packed ⌈n/2⌉ and absmax codes
    ⌈n/bs⌉ of 1 byte, nested absmax ⌈⌈n/bs⌉/256⌉, offset 1 and the 16 + 256 table entries of 4."""
    if s.quant in ("int8", "fp8"):
        return [(out, inp), (out, FP32)]
    if s.quant != "nf4":
        return [(out, inp * s.dtype_bytes)]
    n = out * inp
    blocks = math.ceil(n / NF4_BLOCKSIZE)
    return [(math.ceil(n / 2), 1), (blocks, 1), (math.ceil(blocks / NESTED_BLOCKSIZE), FP32), (1, FP32),
            (len(NF4_VALUES), FP32), (dynamic_map().numel(), FP32)]


def block_tensors(s: Setup, kind: str) -> list[tuple[int, int]]:
    """One decoder block's tensors as (dim-0 length, bytes per row): ``base`` the 7 linears'
    (`linear_tensors`), ``norms`` the two RMSNorm weights (H, e), ``lora`` fp32 A (r, in) and
    B (out, r) per targeted linear."""
    shapes, r = linear_shapes(s.cfg), s.lora_rank
    if kind == "base":
        return [t for o, i in shapes.values() for t in linear_tensors(s, o, i)]
    if kind == "norms":
        return [(s.cfg.hidden_size, s.dtype_bytes)] * 2
    return [t for name, (o, i) in shapes.items() if name in s.targets for t in ((r, i * FP32), (o, r * FP32))]


def root_tensors(s: Setup) -> list[tuple[int, int]]:
    """What ``fully_shard`` at the root holds: the embedding (V, H·e), the head unless tied, the
    final norm (H, e)."""
    cfg, e = s.cfg, s.dtype_bytes
    heads = 1 if cfg.tie_word_embeddings else 2
    return [(cfg.vocab_size, cfg.hidden_size * e)] * heads + [(cfg.hidden_size, e)]


def shard_bytes(tensors: list[tuple[int, int]], ranks: int) -> int:
    """One rank's shard: FSDP2 splits dim 0 in ``ranks`` chunks padded up, Σ ⌈k/G⌉ · row bytes."""
    return sum(math.ceil(k / ranks) * row for k, row in tensors)


def parallel_parts(s: Setup, p: Plan) -> None:
    """The weights, adapter and communication parts of one GPU's peak, by strategy (G = gpus):

    * single: base weights, embeddings/head/norms, LoRA's fp32 params + grads + AdamW moments.
    * ddp: the same on every rank, plus the gradient buckets DDP reduces in: a copy of the
      adapter gradients, 4 bytes per LoRA parameter.
    * fsdp (FSDP2, ``fully_shard`` per decoder block and at the root): every block tensor —
      base weights (NF4 all-gathered as its quantized bytes), norms, LoRA — sharded on dim 0,
      `shard_bytes`; the root's tensors unsharded on every rank from the forward to the end of
      the backward (the full tensors plus the rank's own 1/G shard, which stays allocated); the
      all-gather output of 2 blocks (the one computing and the one prefetched; a block recomputed
      under checkpointing is gathered again, still 2 live); LoRA's params, fp32 gradient shards
      (the reduce-scatter output) and AdamW moments sharded, 4 · shard(lora); and the unsharded
      fp32 gradients of the one block whose backward is in flight, the reduce-scatter's input.
    """
    L, G = s.cfg.num_hidden_layers, s.gpus
    base_note = {"nf4": "NF4 (packed + absmax + nested stats)", "int8": "int8 codes + fp32 row absmax",
                 "fp8": "e4m3 codes + fp32 row scales"}.get(s.quant, f"{s.dtype_bytes}-byte dense")
    lora_note = f"{lora_param_count(s):,} fp32 params × 4"
    if s.strategy != "fsdp":
        p.add("base weights", base_weight_bytes(s), base_note)
        p.add("embeddings, head, norms", embedding_bytes(s), "tied head" if s.cfg.tie_word_embeddings
              else "untied head")
        p.add("LoRA params + grads + AdamW", lora_bytes(s), lora_note)
        if s.strategy == "ddp":
            p.add("DDP gradient buckets", FP32 * lora_param_count(s), "a copy of the LoRA grads, fp32")
        return
    root = root_tensors(s)
    block = [*block_tensors(s, "base"), *block_tensors(s, "norms"), *block_tensors(s, "lora")]
    p.add("base weights", L * shard_bytes(block_tensors(s, "base"), G), f"1/{G} shard of {L} blocks, " + base_note)
    p.add("embeddings, head, norms", shard_bytes(root, 1) + shard_bytes(root, G)
          + L * shard_bytes(block_tensors(s, "norms"), G), f"root unsharded + its 1/{G} shard; block norms 1/{G}")
    p.add("LoRA params + grads + AdamW", 4 * L * shard_bytes(block_tensors(s, "lora"), G), f"1/{G} of " + lora_note)
    p.add("all-gather buffers (2 blocks)", 2 * shard_bytes(block, 1), "computing + prefetched block, unsharded")
    p.add("unsharded block gradients", shard_bytes(block_tensors(s, "lora"), 1), "one block's LoRA grads, fp32")


def plan(s: Setup) -> Plan:
    """The parts of the predicted peak (module docstring) for one setup."""
    cfg, N, e, L = s.cfg, s.tokens, s.dtype_bytes, s.cfg.num_hidden_layers
    block_input = N * cfg.hidden_size * e
    p = Plan()
    parallel_parts(s, p)
    offloaded = s.checkpointing and s.offload and s.device == "cuda"  # on a CPU the host *is* the device
    if offloaded:
        p.host_bytes = L * block_input
        p.add("saved activations", 0, f"{L} block inputs in host memory")
    elif s.checkpointing:
        p.add("saved activations", L * block_input, f"{L} block inputs N·H·e" + (" (offloaded: CPU memory)"
                                                                                 if s.offload else ""))
    else:
        p.add("saved activations", L * saved_per_block(s, recompute=False), f"{L} blocks × saved_per_block")
    backward = block_backward_transient(s)
    if s.checkpointing:  # the recomputed block's own saves (its input is already counted, or fetched back)
        backward += saved_per_block(s, recompute=True) - (0 if offloaded else block_input)
        backward += block_input if offloaded else 0  # the next block's input, prefetched
    loss = loss_working_set(s) + (block_input if offloaded else 0)  # the last block input's copy in flight
    p.add("largest transient", max(backward, loss), "block backward (recompute + gradients)" if backward >= loss
          else "loss (final norm + " + ("fused linear-CE chunk)" if s.kernel_path else "fp32 logits ×3)"))
    tensors = p.peak
    if s.device == "cuda":
        p.add("CUDA context + allocator", CUDA_CONTEXT_BYTES + CUDA_ALLOCATOR_SLACK * tensors,
              f"{CUDA_CONTEXT_BYTES / 2**30:g} GiB context + {CUDA_ALLOCATOR_SLACK:.0%} fragmentation")
    else:
        p.add("process overhead", CPU_RUN_OVERHEAD_BYTES, "tokenizer, data, torch CPU runtime (stated constant)")
    return p
