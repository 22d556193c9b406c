"""The one map between HF llama checkpoints and llama.cpp's GGUF layout, used both ways
(`tools.gguf_to_hf` reads GGUF, `models.gguf_writer` and `engine.export` write it).

* Tensor names: ``model.layers.3.self_attn.q_proj.weight`` <-> ``blk.3.attn_q.weight``.
* q/k rows: llama.cpp's RoPE rotates interleaved pairs ``(2i, 2i+1)``, HF's rotates halves
  ``(i, i + hd/2)``; permuting the rows of q_proj and k_proj per head (`permute_qk`) makes the
  two compute the same attention scores, `unpermute_qk` undoes it exactly.
* Pre-tokenizers: llama.cpp names its byte-level BPE splitting rules (``tokenizer.ggml.pre``);
  `PRE_TOKENIZERS` gives the HF ``tokenizer.json`` pre-tokenizer of each name we handle, and
  `pre_tokenizer_name` reads a tokenizer.json's back to its name.
"""

from __future__ import annotations

import torch

from models.errors import InputError

# GGUF tensor name -> HF tensor name (the ".weight"/".bias" suffix is carried over).
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_HF_GLOBAL = {hf: gg for gg, hf in GLOBAL_NAMES.items()}
_HF_LAYER = {hf: gg for gg, hf in LAYER_NAMES.items()}


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise InputError(f"tensor {gguf_name!r}: not a tensor of a llama-architecture GGUF")


def gguf_tensor_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (inverse of `hf_tensor_name`)."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _HF_GLOBAL:
        return f"{_HF_GLOBAL[stem]}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _HF_LAYER:
        return f"blk.{int(parts[2])}.{_HF_LAYER[parts[3]]}.{suffix}"
    raise InputError(f"tensor {hf_name!r}: has no llama.cpp name (not a tensor of a llama model)")


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's row permutation of q/k (HF -> GGUF): per head, rows ``[first half | second half]``
    are interleaved ``(h0, h_half, h1, h_half+1, ...)``. ``w``: (n_heads * hd, ...)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_qk` (GGUF -> HF): rows ``(2i, 2i+1)`` of each head go back to
    ``(i, i + hd/2)``. ``w``: (n_heads * hd, ...) — a weight (rows, in) or a bias (rows,)."""
    if w.shape[0] % (2 * n_heads):
        raise InputError(f"q/k tensor with {w.shape[0]} rows cannot be split into {n_heads} heads of even size")
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers of byte-level BPE vocabularies (tokenizer.ggml.model == "gpt2").
# ---------------------------------------------------------------------------------------------

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    """ByteLevel pre-tokenizer; with ``use_regex`` it splits with the GPT-2 regex (GPT2_REGEX)."""
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# llama.cpp pre-tokenizer name (tokenizer.ggml.pre) -> (HF pre-tokenizers, BPE ignore_merges).
# llama.cpp splits "smollm"/"starcoder"/"refact" with "\p{N}" then the GPT-2 regex, i.e. single
# digits then GPT-2 words; "llama-bpe" (Llama 3) with the Llama-3 regex and whole-word lookup first.
PRE_TOKENIZERS = {
    "gpt-2": ([_byte_level(True)], False),
    "gpt2": ([_byte_level(True)], False),
    "smollm": ([{"type": "Digits", "individual_digits": True}, _byte_level(True)], False),
    "starcoder": ([{"type": "Digits", "individual_digits": True}, _byte_level(True)], False),
    "refact": ([{"type": "Digits", "individual_digits": True}, _byte_level(True)], False),
    "llama-bpe": ([{"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
                    "invert": False}, _byte_level(False)], True),
}
# The name written for each distinct rule (several names of PRE_TOKENIZERS split alike).
_WRITTEN_PRE = ("gpt-2", "smollm", "llama-bpe")


def _pre_key(step: dict) -> tuple:
    """What decides how a pre-tokenizer step splits (offset bookkeeping like trim_offsets does not)."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return kind, bool(step.get("add_prefix_space", True)), bool(step.get("use_regex", True))
    if kind == "Digits":
        return kind, bool(step.get("individual_digits", False))
    if kind == "Split":
        pattern = step.get("pattern") or {}
        return kind, tuple(sorted(pattern.items())), step.get("behavior"), bool(step.get("invert", False))
    return (kind,)


def _pre_steps(pre_tokenizer: dict | None) -> list[dict]:
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return list(pre_tokenizer.get("pretokenizers") or [])
    return [pre_tokenizer]


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """The llama.cpp name (``tokenizer.ggml.pre``) of a tokenizer.json ``pre_tokenizer`` entry."""
    key = [_pre_key(s) for s in _pre_steps(pre_tokenizer)]
    for name in _WRITTEN_PRE:
        if key == [_pre_key(s) for s in PRE_TOKENIZERS[name][0]]:
            return name
    raise InputError(f"pre-tokenizer {[k[0] for k in key]} is not one llama.cpp knows that we can name "
                     f"(known: {', '.join(_WRITTEN_PRE)}: GPT-2, SmolLM2/StarCoder digits + GPT-2, Llama 3)")
