"""Causal attention over packed documents, described by document boundaries, never by a (T, S) mask.

A training row of T tokens holds documents one after another (packing), possibly followed or
preceded by padding. Query i may attend key j of the same row iff

    doc[i] == doc[j]  and  j <= i  [and  i - j < W   (Mistral's sliding window W)]

where ``doc`` (B, T) numbers the contiguous documents of each row 0, 1, ... in order. Padding is
treated as documents of its own: a run of padding tokens is one document, so a pad query sees at
least itself (never an all-masked row, which would give NaN) and no real query ever sees a pad key;
pad outputs are garbage that no loss reads. `DocumentLayout` holds ``doc`` (built on the device
from ``segment_ids`` and/or a padding ``attention_mask`` with no host read) and, when known, the
document lengths per row on the host (a collator that packed the row knows them already:
`DocumentLayout.from_lengths`).

Assumption: a segment is contiguous and padding never sits *inside* a document. A row
``[a a pad a]`` is read as three documents here, whereas the dense mask of `models.llama`
(``same segment & key is real``) would let the last ``a`` see the first two; packed and
right/left-padded batches never have that shape.

A key/value prefix (prefix tuning: ``prefix = (pk, pv)``, each (B or 1, nkv, P, hd), the same P
keys for every document of a row) is seen by every query as if each document were a sequence of its
own that follows the P prefix positions, as HF PEFT hands a prefix to transformers (a filled cache
of P positions; no RoPE is applied to it here either): prefix key p sits at position p, document
token i at P + i, so query i of a document attends every prefix key and its document's keys
j <= i [and, with a window, key positions within W of P + i: prefix key p iff P + i - p < W].

Implementations, one public op `document_attention(q, k, v, layout, sliding_window, prefix)`,
q (B, nh, T, hd), k, v (B, nkv, T, hd) → (B, nh, T, hd), nh a multiple of nkv (GQA):

* `document_attention_ref` — the definition: the dense (B, 1, T, T) mask and SDPA. Tests only.
* `document_attention_sdpa` (CPU, and anything that is not CUDA) — one SDPA call with
  ``is_causal=True, enable_gqa`` per document slice (k/v split along T, no copy, no repeat). CPU
  SDPA takes its flash kernel there (also with GQA and in bf16), whose memory is O(T·hd) per
  call, so the whole op is linear in T and skips the cross-document blocks entirely. With a
  sliding window, documents longer than W are cut into query chunks of C = `WINDOW_CHUNK` rows;
  chunk [a, a+C) attends keys [a-W+1, a+C) only, with a (C, C+W-1) band mask: memory
  O(C·(C+W)), never T×T. Keys are gathered by `torch.cat` of whole key chunks (whose backward
  is a split), so backward stays linear too. With a prefix, each document runs as the sequence
  [prefix; document] of P + L positions whose first P queries are zeros and their outputs dropped:
  SDPA's ``is_causal`` (upper-left aligned) then gives query P + i exactly the prefix and keys
  <= i, still with no mask (and the window path the same band over P + L), at P extra query rows
  per document.
* `document_attention_flex` (CUDA) — FlexAttention with a `BlockMask` made by `create_block_mask`
  from the ``doc`` tensor (one mask_mod for every variant, `document_mask_mod`: over the keys
  [prefix; row], kv index < P always visible but for the window; P = 0 without a prefix),
  ``enable_gqa``;
  both `flex_attention` and `create_block_mask` are compiled once per process (module-level
  cache, `compile_flex`: dynamic shapes, one graph per kind of call rather than per shape, under
  `RECOMPILE_LIMIT` since a mixed run passes dynamo's default of 8, past which it would run eager
  FlexAttention with (T × T) scores); the block mask is built once per forward and shared by all
  layers (cached on the layout). UNMEASURED on a GPU; on CPU the tests check the mask_mod, the
  eager forward, and the compiled forward's graph count (dynamo's eager backend).

Why per-document SDPA on CPU, measured (``python -m bench.bench_attention``: forward + backward
of the attention alone, fp32, 1 row in 8 documents, SmolLM2 heads nh 9, nkv 3, hd 64, 2 shared
cores under load, OMP_NUM_THREADS=1; table in `bench/bench_attention.py`): at 4,096 tokens the
dense-mask SDPA that `models.llama` used took 7.1-7.9 s and +181-226 MB peak RSS, per-document
SDPA 0.7-1.1 s and +64-97 MB; at 8,192 tokens 77 s / +389 MB against 5.6 s / +102 MB. A
chunked online-softmax in plain torch would be linear too but slower than the flash kernel,
which CPU SDPA already offers per slice with GQA; per-document slicing also skips the
cross-document work the dense mask only hides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

WINDOW_CHUNK = 256  # query rows per band chunk of the CPU sliding-window path


@dataclass
class DocumentLayout:
    """The documents of a (B, T) batch: ``doc_ids`` (B, T) int64, non-decreasing along each row,
    0 at its first token, +1 at each document (or padding run) boundary; ``lengths`` (optional,
    host): per row the document lengths in order (each row sums to T).

    Build it with `from_batch` (device ops only) or `from_lengths` (host lists, e.g. in a
    collator; then the CPU path needs no device read either). Pass it to the model in place of
    ``segment_ids``.
    """

    doc_ids: torch.Tensor
    lengths: list[list[int]] | None = None
    _block_masks: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_batch(cls, attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None) -> DocumentLayout:
        """Documents from segment ids (B, T) and/or a padding mask (B, T) (1 = real token): a new
        document starts wherever the segment id or the real/pad state changes."""
        ref = segment_ids if segment_ids is not None else attention_mask
        if ref is None:
            raise ValueError("DocumentLayout.from_batch needs segment_ids or attention_mask")
        B, T = ref.shape
        change = torch.zeros(B, T, dtype=torch.bool, device=ref.device)  # (B, T): True where a document starts
        if segment_ids is not None:
            change[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
        if attention_mask is not None:
            real = attention_mask.bool()
            change[:, 1:] |= real[:, 1:] != real[:, :-1]
        return cls(change.long().cumsum(dim=1))

    @classmethod
    def from_lengths(cls, lengths: list[list[int]], device: torch.device | str | None = None) -> DocumentLayout:
        """From host document lengths per row (padding runs count as documents); rows must have equal sums."""
        widths = {sum(row) for row in lengths}
        if len(widths) != 1 or any(n <= 0 for row in lengths for n in row):
            raise ValueError(f"document lengths must be positive and sum to the same T in every row, got {lengths}")
        doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
                               for row in lengths])  # (B, T)
        return cls(doc_ids.to(device), [list(row) for row in lengths])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.doc_ids.shape)

    def host_lengths(self) -> list[list[int]]:
        """Document lengths per row; read from the device once if not given (cached)."""
        if self.lengths is None:
            self.lengths = [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in self.doc_ids.cpu()]
        return self.lengths

    def positions(self) -> torch.Tensor:
        """(B, T) index of each token inside its document (RoPE positions restarting at 0)."""
        B, T = self.shape
        idx = torch.arange(T, device=self.doc_ids.device).expand(B, T)
        starts = torch.ones_like(self.doc_ids, dtype=torch.bool)
        starts[:, 1:] = self.doc_ids[:, 1:] != self.doc_ids[:, :-1]
        first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T) own doc start
        return idx - first

    def to(self, device: torch.device | str) -> DocumentLayout:
        return DocumentLayout(self.doc_ids.to(device), self.lengths)


# ----------------------------------------------------------------------------------------------
# The mask (the CUDA path's mask_mod) and the definition (tests only: the dense (B, T, T) mask)

NO_WINDOW = 1 << 62  # a window no distance reaches: "no window" as a value (see document_mask_mod)


def document_mask_mod(doc_ids: torch.Tensor, positions: torch.Tensor, prefix_len: int = 0,
                      sliding_window: int | None = None):
    """FlexAttention mask_mod(b, h, q_idx, kv_idx) -> bool over the keys [prefix (P); row (T)]: a
    row key j = kv_idx - P is visible when it is in the query's document, causal and within the
    window (q_idx - j < W); a prefix key kv_idx < P is visible to every query within the window
    (P + position of the query in its document - kv_idx < W). ``positions`` (B, T):
    `DocumentLayout.positions`; with P = 0 there is no prefix key and this is plain
    document-causal attention.

    One code object for every variant: P and W are captured as 0-d device tensors (made by a fill,
    no host copy), not as Python values or branches. Compiled `create_block_mask` and
    `flex_attention` guard the mask_mod's code object and its Python constants, so one mask_mod
    per variant (a prefix-tuned policy and its base reference in one process) would add its own
    graphs and pass dynamo's recompile limit, past which FlexAttention runs eagerly with (T × T)
    scores."""
    P = torch.full((), prefix_len, dtype=torch.long, device=doc_ids.device)
    W = torch.full((), NO_WINDOW if sliding_window is None else sliding_window, dtype=torch.long,
                   device=doc_ids.device)

    def mask_mod(b, h, q_idx, kv_idx):
        in_prefix = kv_idx < P
        j = torch.where(in_prefix, 0, kv_idx - P)  # the row key (any valid index for prefix keys)
        row = (doc_ids[b, q_idx] == doc_ids[b, j]) & (j <= q_idx) & ~in_prefix & (q_idx - j < W)
        pre = in_prefix & (positions[b, q_idx] + P - kv_idx < W)
        return row | pre
    return mask_mod


def document_mask_ref(layout: DocumentLayout, sliding_window: int | None = None) -> torch.Tensor:
    """The dense (B, T, T) boolean mask the layout stands for (True = may attend)."""
    B, T = layout.shape
    i = torch.arange(T, device=layout.doc_ids.device)[:, None]  # (T, 1) query
    j = torch.arange(T, device=layout.doc_ids.device)[None, :]  # (1, T) key
    allowed = (layout.doc_ids[:, :, None] == layout.doc_ids[:, None, :]) & (j <= i)  # (B, T, T)
    if sliding_window is not None:
        allowed = allowed & (i - j < sliding_window)
    return allowed


def document_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                           sliding_window: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hd) + log mask) v with the dense mask, math SDPA in fp32."""
    mask = document_mask_ref(layout, sliding_window)[:, None]  # (B, 1, T, T)
    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return y.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# CPU: per-document SDPA (flash), banded for a sliding window

def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] > 1, enable_gqa=gqa)


def _banded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, gqa: bool, C: int) -> torch.Tensor:
    """Causal sliding-window attention of one document (1, heads, L, hd), query chunks of C rows.

    Chunk c holds queries [a, b), a = c·C; its keys are [k0, b), k0 = max(0, a - W + 1), a band of
    at most C + W - 1 keys; mask (b-a, b-k0): key k0+j allowed for query a+i iff
    0 <= (a+i) - (k0+j) < W.
    """
    L = q.shape[2]
    k_chunks, v_chunks = k.split(C, dim=2), v.split(C, dim=2)
    out = []
    for c, qc in enumerate(q.split(C, dim=2)):
        a, b = c * C, c * C + qc.shape[2]
        k0 = max(0, a - window + 1)
        c0 = k0 // C
        kc = torch.cat(k_chunks[c0:c + 1], dim=2)[:, :, k0 - c0 * C:]  # (1, nkv, b-k0, hd)
        vc = torch.cat(v_chunks[c0:c + 1], dim=2)[:, :, k0 - c0 * C:]
        qi = torch.arange(a, b, device=q.device)[:, None]  # (b-a, 1)
        kj = torch.arange(k0, b, device=q.device)[None, :]  # (1, b-k0)
        band = (kj <= qi) & (qi - kj < window)  # (b-a, b-k0)
        out.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=band, enable_gqa=gqa))
    assert sum(o.shape[2] for o in out) == L
    return torch.cat(out, dim=2)


def document_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                            sliding_window: int | None = None, window_chunk: int = WINDOW_CHUNK,
                            prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per row, per document: SDPA on the (heads, L, hd) slices; memory linear in T (see module doc).
    ``window_chunk``: query rows per band chunk with a sliding window (tests make it small).
    ``prefix``: (pk, pv), each (B or 1, nkv, P, hd), put before every document's keys."""
    gqa = q.shape[1] != k.shape[1]
    rows = []
    for b, (qb, kb, vb) in enumerate(zip(q.unbind(0), k.unbind(0), v.unbind(0))):
        lengths = layout.host_lengths()[b]
        pk = pv = None
        if prefix is not None:  # fp32 here, cast per document: the gradient's sum over documents is fp32
            pk, pv = (t[b if t.shape[0] > 1 else 0].float() for t in prefix)  # (nkv, P, hd)
        docs = []
        for qd, kd, vd in zip(qb.split(lengths, dim=1), kb.split(lengths, dim=1), vb.split(lengths, dim=1)):
            P = 0
            if pk is not None:  # the sequence [prefix; document]; the prefix's P query rows are zeros, dropped
                P = pk.shape[1]
                qd = torch.cat((qd.new_zeros(qd.shape[0], P, qd.shape[2]), qd), dim=1)
                kd, vd = torch.cat((pk.to(kd.dtype), kd), dim=1), torch.cat((pv.to(vd.dtype), vd), dim=1)
            qd, kd, vd = qd[None], kd[None], vd[None]  # (1, heads, P + L, hd)
            if sliding_window is not None and qd.shape[2] > sliding_window:
                y = _banded(qd, kd, vd, sliding_window, gqa, window_chunk)
            else:
                y = _causal(qd, kd, vd, gqa)
            docs.append(y[:, :, P:])  # (1, nh, L, hd)
        rows.append(torch.cat(docs, dim=2))  # (1, nh, T, hd)
    return torch.cat(rows, dim=0)  # (B, nh, T, hd)


# ----------------------------------------------------------------------------------------------
# CUDA: FlexAttention with a block mask from the document ids

_COMPILED: dict[str, object] = {}  # "flex" / "block_mask" -> compile_flex'd function, made once
# Graphs dynamo may keep per function here (its default, 8, is global). One graph per kind of call,
# not per shape: B 1 or more, T of 1, within one 128-block or more, keys in one more block than the
# queries (a prefix), grad mode on or off (a DPO policy and its reference) - a few dozen at most,
# each compiled once; past the limit a call would run eager FlexAttention with (T × T) scores.
RECOMPILE_LIMIT = 64


def compile_flex(fn, backend: str = "inductor"):
    """``fn`` (`flex_attention` or `create_block_mask`) compiled with dynamic shapes from the first
    call (no graph for the first batch's exact shape) and run under `RECOMPILE_LIMIT`;
    ``backend="eager"`` (tests) keeps dynamo's guards and recompiles without Inductor."""
    import torch._dynamo

    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)(torch.compile(fn, backend=backend,
                                                                                     dynamic=True))


def _compiled(name: str):
    if name not in _COMPILED:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        _COMPILED[name] = compile_flex(flex_attention if name == "flex" else create_block_mask)
    return _COMPILED[name]


def block_mask_for(layout: DocumentLayout, sliding_window: int | None = None, compiled: bool = True,
                   prefix_len: int = 0):
    """The layout's `BlockMask` (B, 1, T, P + T in blocks of 128), built once per (layout, window, P)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (sliding_window, compiled, prefix_len)
    if key not in layout._block_masks:
        B, T = layout.shape
        make = _compiled("block_mask") if compiled else create_block_mask
        mask_mod = document_mask_mod(layout.doc_ids, layout.positions(), prefix_len, sliding_window)
        layout._block_masks[key] = make(mask_mod, B, None, T, prefix_len + T, device=layout.doc_ids.device)
    return layout._block_masks[key]


def document_attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                            sliding_window: int | None = None, compiled: bool = True,
                            prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """FlexAttention over the block mask; ``compiled=False`` runs eager (CPU forward, tests). A
    ``prefix`` is put before the row's keys (B, nkv, P + T, hd), `document_mask_mod`."""
    from torch.nn.attention.flex_attention import flex_attention

    P = 0
    if prefix is not None:
        P = prefix[0].shape[2]
        B = q.shape[0]
        # expanded in fp32 and then cast: the gradient's sum over rows is fp32
        k = torch.cat((prefix[0].float().expand(B, -1, -1, -1).to(k.dtype), k), dim=2)
        v = torch.cat((prefix[1].float().expand(B, -1, -1, -1).to(v.dtype), v), dim=2)
    attend = _compiled("flex") if compiled else flex_attention
    return attend(q, k, v, block_mask=block_mask_for(layout, sliding_window, compiled, P),
                  enable_gqa=q.shape[1] != k.shape[1])


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                       sliding_window: int | None = None,
                       prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention within documents: q (B, nh, T, hd), k, v (B, nkv, T, hd) → (B, nh, T, hd);
    ``prefix`` (pk, pv), each (B or 1, nkv, P, hd), any float dtype (cast to q's per use, the
gradient summed over documents and rows in fp32): keys every document sees first (module doc).

    FlexAttention on CUDA tensors, per-document SDPA elsewhere; both equal `document_attention_ref`
    (without a prefix) and the dense definition of the tests (with one).
    """
    if q.is_cuda:
        return document_attention_flex(q, k, v, layout, sliding_window, prefix=prefix)
    return document_attention_sdpa(q, k, v, layout, sliding_window, prefix=prefix)
