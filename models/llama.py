"""The Llama model family (Llama 2/3/3.1, Mistral, TinyLlama, SmolLM2) in one readable file.

Top-down: the three ops (`rms_norm`, `apply_rope`, `swiglu`, from kernels/),
the rotary frequencies, the attention mask (generation with a KV cache only: training batches go
through `models.attention.document_attention`, which never builds a (T, S) mask), the KV cache,
then the modules RMSNorm → attention → MLP → decoder block → model → causal LM. Module and
parameter names mirror transformers' exactly (``model.layers.0.self_attn.q_proj.weight``), so
checkpoints and PEFT adapters map one to one.

Prefix tuning: a module attached as ``model.model.prefix_encoder`` (whatever it is: the model only
reads its ``num_virtual_tokens`` P and calls it) returns per layer a key/value prefix (pk, pv), each
(1 or B, nkv, P, hd), or None (off).
The model then runs as HF PEFT runs transformers' Llama with it: the prefix is a filled cache of P
positions before the tokens (no RoPE applied to it), every token's RoPE position is shifted by P
(explicit ``position_ids`` too, as PeftModel does), every query (every packed document, every
padded row) sees all P prefix positions; with a cache from `LlamaForCausalLM.new_cache` the
prefix is put in its first P positions by the first forward (inside the forward, where FSDP2 has
the parameters whole), before the prompt.

Shapes: B batch, T new tokens, S key length (cache + new), H hidden, nh query heads, nkv key/value
heads, hd head dim, V vocabulary, P prefix positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.nf4 import keep_dequantized
from kernels.rms_norm import rms_norm
from kernels.rope import apply_rope
from kernels.rope import rope_inv_freq as kernel_rope_inv_freq
from kernels.swiglu import swiglu, swiglu_packed
from models.attention import DocumentLayout, document_attention
from models.config import LlamaConfig
from models.mlp_chunks import in_token_chunks
from models.offload import HostStash, offloaded_checkpoint
from models.presets import PRESETS, Preset
from models.projection import project_together

__all__ = ["LlamaConfig", "PRESETS", "Preset", "LlamaForCausalLM", "LlamaModel", "KVCache", "DocumentLayout",
           "rms_norm", "apply_rope", "swiglu", "rope_inv_freq"]


# ----------------------------------------------------------------------------------------------
# Ops: the public ops of kernels/ — Triton on CUDA tensors, their plain-torch references elsewhere
# (and everywhere under ENGINE_KERNELS=reference / kernels.backend.use_reference(), the A/B switch).
#   rms_norm(x, weight, eps)                 y = x / sqrt(mean(x², -1) + eps) * weight, fp32 math
#   apply_rope(q, k, position_ids, inv_freq)  x*cos + rotate_half(x)*sin, angle = pos * inv_freq
#   swiglu(gate, up)                         silu(gate) * up   (swiglu_packed: [gate | up] in one tensor)


def rope_inv_freq(cfg: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (hd/2,) fp32 with the config's scaling (default, linear, llama3),
    bit-identical to transformers' (see `kernels.rope.rope_inv_freq`), on ``device`` (default: the
    default device). Computed on the CPU and then moved: on meta (a model skeleton) the same ops
    run torch's Python references, whose first call imports torch._dynamo (~1 s of a fresh load)."""
    with torch.device("cpu"):
        inv_freq = kernel_rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return inv_freq.to(torch.get_default_device() if device is None else device)


# ----------------------------------------------------------------------------------------------
# Attention mask and KV cache

@dataclass
class AttentionMask:
    """What SDPA needs: either ``is_causal`` (no explicit mask) or a boolean ``allowed`` (B, 1, T, S),
    True = may attend. Both off means attend to every key (one new token after the cache)."""
    allowed: torch.Tensor | None
    is_causal: bool


def build_attention_mask(key_real: torch.Tensor | None, segment_ids: torch.Tensor | None,
                         sliding_window: int | None, past: int, T: int,
                         device: torch.device) -> AttentionMask:
    """Allowed (query i, key j), in absolute indices qi = past + i, kj = j < past + T:
    kj <= qi (causal), kj > qi - window (Mistral, as transformers: the token and window-1 before),
    key j is a real token (key_real (B, S)), same segment (segment_ids (B, T), no cache).

    A query always sees itself, so a padding query never gets an all-False row (SDPA would return
    NaN there); its output is garbage that no one reads.
    """
    S = past + T
    windowed = sliding_window is not None and S > sliding_window
    if key_real is None and segment_ids is None and not windowed:
        if past == 0:
            return AttentionMask(None, is_causal=T > 1)
        if T == 1:
            return AttentionMask(None, is_causal=False)
    qi = torch.arange(past, S, device=device)[:, None]  # (T, 1)
    kj = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = kj <= qi  # (T, S)
    if windowed:
        allowed = allowed & (kj > qi - sliding_window)
    allowed = allowed[None]  # (1, T, S)
    if key_real is not None:
        allowed = allowed & key_real[:, None, :].bool()  # (B, T, S)
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])  # (B, T, T)
    allowed = allowed | (kj == qi)
    return AttentionMask(allowed[:, None], is_causal=False)  # (B|1, 1, T, S)


def training_layout(key_real: torch.Tensor | None, segment_ids: torch.Tensor | None,
                    sliding_window: int | None, B: int, T: int, device: torch.device) -> DocumentLayout | None:
    """Without a cache: the `DocumentLayout` of a batch with padding (key_real (B, T)), packed
    documents (segment_ids (B, T)) or a sliding window shorter than T; None when every row is one
    plain causal sequence (SDPA's ``is_causal`` path)."""
    if key_real is not None or segment_ids is not None:
        return DocumentLayout.from_batch(key_real, segment_ids)
    if sliding_window is not None and T > sliding_window:
        return DocumentLayout.from_lengths([[T]] * B, device)
    return None


class KVCache:
    """Preallocated keys/values for generation: per layer (B, nkv, max_len, hd).

    ``length`` positions are filled; ``key_real`` (B, max_len) marks real tokens (padding is masked
    out of later attention); ``next_position`` (B,) is each row's next RoPE position (the number of
    real tokens so far), so left-padded prompts continue at the right position.
    """

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.key_real = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0
        self.padded = False  # whether any padding was ever cached (then masks are explicit)
        self.prefix_length = 0  # P positions of a prefix-tuning prefix at the start (`put_prefix`)
        self.prefix_pending = False  # the first forward puts the model's prefix in (`new_cache`)

    @torch.no_grad()
    def put_prefix(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fill the first P positions of an empty cache with a per-layer prefix (pk, pv), each
        (1 or B, nkv, P, hd): real keys at positions 0..P-1, the tokens' positions continue at P."""
        if self.length:
            raise ValueError("put_prefix: the cache already holds tokens")
        P = prefix[0][0].shape[2]
        for layer, (pk, pv) in enumerate(prefix):
            self.k[layer][:, :, :P] = pk
            self.v[layer][:, :, :P] = pv
        self.length = self.prefix_length = P
        self.next_position += P

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new k, v (B, nkv, T, hd) after the cached ones; return all (B, nkv, S, hd)."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def default_position_ids(attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None,
                         cache: KVCache | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """(B, T) RoPE positions: cumsum(mask)-1 clamped at 0 (plus the cache's next position); with
    segment_ids, the index inside each packed document (so each document starts at 0)."""
    if segment_ids is not None:
        idx = torch.arange(T, device=device).expand(B, T)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # start of own document
        return idx - first
    mask = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.long, device=device)
    pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return pos if cache is None else pos + cache.next_position[:, None]


# ----------------------------------------------------------------------------------------------
# Modules

class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    """Grouped-query attention with RoPE: `document_attention` for a `DocumentLayout` (training
    without a cache), else F.scaled_dot_product_attention with an `AttentionMask`. q, k, v are
    computed together (`models.projection.project_together`: one grouped op for the three)."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=bias)
        self.sliding_window = cfg.sliding_window

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                mask: AttentionMask | DocumentLayout, cache: KVCache | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``prefix`` (pk, pv) (1 or B, nkv, P, hd): keys/values every query sees (needs a
        `DocumentLayout`; with a cache the prefix is in the cache instead)."""
        B, T, _ = x.shape
        qkv = project_together(x, (self.q_proj, self.k_proj, self.v_proj))  # (B, T, (nh + 2·nkv)·hd)
        q, k, v = qkv.split((self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim), -1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv, self.head_dim)  # (B, T, nkv, hd)
        # a copy of v (attention saves it): a view would keep all of qkv alive until the backward
        v = v.reshape(B, T, self.n_kv, self.head_dim).contiguous()  # (B, T, nkv, hd)
        q, k = apply_rope(q, k, position_ids, inv_freq)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, S, hd)
        if isinstance(mask, DocumentLayout):
            # a prefix is cast to the compute dtype inside (as PEFT casts it to the base's), per document
            y = document_attention(q, k, v, mask, self.sliding_window, prefix)  # (B, nh, T, hd)
        elif prefix is not None:
            raise ValueError("a key/value prefix needs a DocumentLayout (or a cache holding it)")
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed, is_causal=mask.is_causal,
                                               enable_gqa=self.n_kv != self.n_heads)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


def _recompute_keeps_dequantized():
    """Checkpoint contexts (forward, recompute) of a block and of an MLP chunk: the ops save each
    NF4 weight they dequantize for their backward, which checkpointing makes free in the forward
    (it drops what the forward saves) and short-lived in the recompute (the backward follows at
    once); both phases must save the same tensors. A weight is then dequantized twice per step,
    not three times (`kernels.nf4.keep_dequantized`)."""
    return keep_dequantized(), keep_dequantized()


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up computed together (``[gate | up]``, one grouped op).

    ``chunk_tokens`` (None: off): in training, over more flattened tokens (B·T) than that, the MLP
    runs over chunks of that many tokens, each checkpointed when autograd is on
    (`models.mlp_chunks.in_token_chunks`): its (tokens, 2I) and (tokens, I) tensors then exist
    for one chunk at a time, for an extra MLP forward per step (and, under NF4, a dequantization
    of its weights per chunk and pass). LoRA dropout draws its masks per chunk.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        H, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)
        self.chunk_tokens: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self.chunk_tokens
        if chunk is not None and self.training and x.numel() > chunk * x.shape[-1]:
            return in_token_chunks(self.project, x, chunk, context_fn=_recompute_keeps_dequantized)
        return self.project(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP on x (..., H) → (..., H), in one piece."""
        return self.down_proj(swiglu_packed(project_together(x, (self.gate_proj, self.up_proj))))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor,
                mask: AttentionMask | DocumentLayout, cache: KVCache | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), position_ids, inv_freq, mask, cache, prefix)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm. Returns the normed hidden states (B, T, H).

    Attention without a cache: plain causal SDPA when every row is one unpadded sequence (and no
    sliding window bites), else `document_attention` over the batch's `DocumentLayout` (packed
    documents from ``segment_ids``, padding runs from ``attention_mask``). ``segment_ids`` may be
    a `DocumentLayout` itself (built by a collator on the host: then nothing is read back from
    the device; ``attention_mask`` is then not consulted for attention). With a cache
    (generation): SDPA with the small (T_new, S) mask of `build_attention_mask`.

    Training with ``gradient_checkpointing``: each block is recomputed in its backward from its
    saved input. ``offload_activations`` holds those inputs in (pinned) CPU memory between the
    forward and the backward (`models.offload`); it implies checkpointing. ``mlp_chunk_tokens``
    runs every block's MLP over token chunks in training (`LlamaMLP`), so that the recomputed
    block's MLP holds one chunk's tensors instead of the whole row's.

    ``prefix_encoder`` (attached by prefix tuning; absent by default): see the module docstring.
    Without a cache its prefix goes to every layer's `document_attention` (a one-document layout
    per row when the batch has no other); with a cache it is already in the cache.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # (hd/2,) fp32
        self.gradient_checkpointing = False
        self.offload_activations = False
        self.prefix_encoder = None  # prefix tuning attaches a module here (see the module docstring)

    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The per-layer prefix (pk, pv) of the attached ``prefix_encoder``, or None (none, or off)."""
        encoder = getattr(self, "prefix_encoder", None)
        prefix = encoder() if encoder is not None else None
        if prefix is not None and len(prefix) != len(self.layers):
            raise ValueError(f"prefix_encoder gave {len(prefix)} layer prefixes for {len(self.layers)} layers")
        return prefix

    @property
    def mlp_chunk_tokens(self) -> int | None:
        """Tokens per MLP chunk in training (`LlamaMLP.chunk_tokens` of every block); None: off."""
        return self.layers[0].mlp.chunk_tokens if len(self.layers) else None

    @mlp_chunk_tokens.setter
    def mlp_chunk_tokens(self, tokens: int | None) -> None:
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"mlp_chunk_tokens: expected None or a whole number >= 1, got {tokens!r}")
        for layer in self.layers:
            layer.mlp.chunk_tokens = tokens

    def _apply(self, fn, recurse=True):
        # .to(bf16) would round inv_freq (and to_empty would leave it garbage): recompute it in fp32
        # on whatever device the module now lives on.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config, self.inv_freq.device)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | DocumentLayout | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        device = input_ids.device
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed training) cannot be combined with a KV cache")
        if cache is not None and cache.prefix_pending:  # a new cache of a model with a prefix encoder
            cache.prefix_pending = False
            with torch.no_grad():
                cache_prefix = self.prefix_kv() if cache.length == 0 else None
            if cache_prefix is not None:
                cache.put_prefix(cache_prefix)
        layout = segment_ids if isinstance(segment_ids, DocumentLayout) else None
        if layout is not None:
            attention_mask = segment_ids = None
        if attention_mask is not None and bool(attention_mask.all()):  # a host read; a layout avoids it
            attention_mask = None  # no padding: keep SDPA's fast causal path
        prefix = self.prefix_kv() if cache is None else None  # with a cache: in the cache (new_cache)
        shift = prefix[0][0].shape[2] if prefix is not None else 0  # P: the tokens follow the prefix
        if position_ids is None:
            position_ids = (layout.positions() if layout is not None
                            else default_position_ids(attention_mask, segment_ids, cache, B, T, device)) + shift
        else:  # PeftModel shifts given positions by P too (a cache's next_position counts P already)
            position_ids = position_ids + (shift if cache is None else cache.prefix_length)
        key_real, past = attention_mask, 0
        if cache is not None:
            past = cache.length
            if past + T > cache.max_len:
                raise ValueError(f"KV cache full: {past} + {T} tokens > max_len {cache.max_len}")
            new_real = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
            cache.key_real[:, past:past + T] = new_real
            cache.next_position += new_real.sum(dim=1)
            cache.padded = cache.padded or attention_mask is not None
            key_real = cache.key_real[:, :past + T] if cache.padded else None
        if cache is None and layout is None:
            layout = training_layout(key_real, segment_ids, self.config.sliding_window, B, T, device)
            if layout is None and prefix is not None:  # the prefix goes through document attention
                layout = DocumentLayout.from_lengths([[T]] * B, device)
        mask = layout if layout is not None else build_attention_mask(
            key_real, segment_ids, self.config.sliding_window, past, T, device)

        h = self.embed_tokens(input_ids)  # (B, T, H)
        checkpointing = ((self.gradient_checkpointing or self.offload_activations) and self.training
                         and torch.is_grad_enabled())
        stash = HostStash(h.device) if checkpointing and self.offload_activations else None
        if stash is not None and prefix is not None:
            # the offloaded block's backward runs its own autograd.backward, which would go through
            # the prefix encoder's graph once per layer; not supported
            raise ValueError("offload_activations cannot be combined with a key/value prefix (prefix tuning)")
        for i, layer in enumerate(self.layers):
            layer_prefix = prefix[i] if prefix is not None else None
            if stash is not None:
                h = offloaded_checkpoint(stash, layer, h, position_ids, self.inv_freq, mask, cache)
            elif checkpointing:
                h = checkpoint(layer, h, position_ids, self.inv_freq, mask, cache, layer_prefix, use_reentrant=False,
                               context_fn=_recompute_keeps_dequantized)
            else:
                h = layer(h, position_ids, self.inv_freq, mask, cache, layer_prefix)
        if cache is not None:
            cache.length += T
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    """`LlamaModel` plus the LM head (tied to the embedding when the config says so)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share embed_tokens.weight as the head weight (again after loading or to_empty)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.model.gradient_checkpointing = enabled

    @property
    def offload_activations(self) -> bool:
        return self.model.offload_activations

    @offload_activations.setter
    def offload_activations(self, enabled: bool) -> None:
        self.model.offload_activations = enabled

    @property
    def mlp_chunk_tokens(self) -> int | None:
        return self.model.mlp_chunk_tokens

    @mlp_chunk_tokens.setter
    def mlp_chunk_tokens(self, tokens: int | None) -> None:
        self.model.mlp_chunk_tokens = tokens

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for ``max_len`` tokens in the model's dtype and device; with an attached
        ``prefix_encoder``, P more positions before them, which the first forward fills with its
        prefix (none if it is off then)."""
        w = self.model.embed_tokens.weight
        encoder = getattr(self.model, "prefix_encoder", None)
        P = encoder.num_virtual_tokens if encoder is not None else 0
        cache = KVCache(self.config, batch_size, max_len + P, w.dtype, w.device)
        cache.prefix_pending = encoder is not None
        return cache

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | DocumentLayout | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, H): final-norm output, what the LM head (or a fused linear+CE) consumes.

        Under DDP it runs through the wrapper given to `route_hidden_states` (DDP prepares its
        gradient all-reduce in its own forward, so the training forward must pass through it)."""
        route = self.__dict__.get("_hidden_states_route")
        if route is not None:
            return route(input_ids, attention_mask, position_ids, segment_ids, cache, hidden_only=True)
        return self.model(input_ids, attention_mask, position_ids, segment_ids, cache)

    def route_hidden_states(self, wrapper: nn.Module | None) -> None:
        """Send `hidden_states` through ``wrapper`` (a module around this model whose forward calls
        this model's ``forward(..., hidden_only=True)``: `torch.nn.parallel.DistributedDataParallel`);
        None: directly again. The wrapper is not registered as a submodule (it holds this model)."""
        self.__dict__["_hidden_states_route"] = wrapper

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | DocumentLayout | None = None,
                cache: KVCache | None = None, hidden_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) in the model's dtype; with ``hidden_only`` the hidden states (B, T, H)."""
        hidden = self.model(input_ids, attention_mask, position_ids, segment_ids, cache)
        return hidden if hidden_only else self.lm_head(hidden)
