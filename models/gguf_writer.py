"""Write a llama model as a llama.cpp GGUF file: metadata, tokenizer, tensors (F32/F16/BF16/Q8_0/Q4_0).

What goes in, as llama.cpp's ``convert_hf_to_gguf.py`` writes it for ``LlamaForCausalLM``:

* ``general.architecture = llama`` and the ``llama.*`` hyper-parameters of `LlamaConfig`; Llama-3
  RoPE scaling as a ``rope_freqs.weight`` tensor of per-frequency divisors, linear scaling as
  ``llama.rope.scaling.*``.
* The tokenizer of the folder's ``tokenizer.json``, byte-level BPE only (``tokenizer.ggml.model =
  gpt2``): tokens (padded to ``vocab_size`` with ``[PADi]``), token types (special added tokens
  CONTROL, other added tokens USER_DEFINED), merges, the pre-tokenizer's llama.cpp name
  (`models.gguf_map.pre_tokenizer_name`), bos/eos/unk/pad ids, ``add_bos_token`` (what the
  post-processor adds) and the chat template.
* Tensors under their llama.cpp names (`models.gguf_map`), q/k rows permuted to llama.cpp's RoPE
  layout; no ``output.weight`` when the embeddings are tied (llama.cpp reuses ``token_embd``).

Tensor types (`tensor_type`): 1-D tensors, norms and biases stay F32, as llama.cpp keeps them.
Q8_0 and Q4_0 quantize in blocks of 32 along a row; a matrix whose rows are not a multiple of 32
falls back to F16, as convert_hf_to_gguf.py does. With Q4_0 the output matrix (``output.weight``,
or ``token_embd`` when tied) is Q8_0: llama-quantize gives it Q6_K, which gguf-py cannot write.
The K-quants (Q4_K_M...) cannot be written by gguf-py at all (`LLAMA_QUANTIZE_ONLY`).
Tensors are written one at a time (header first, then each tensor's data), so the file never
exists whole in memory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.config import LlamaConfig
from models.errors import InputError
from models.gguf_map import gguf_tensor_name, permute_qk, pre_tokenizer_name

# --type name -> (GGML type of the big matrices, gguf.LlamaFileType value for general.file_type).
GGUF_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2)}
LLAMA_QUANTIZE_ONLY = {"q4_k_m": "Q4_K_M"}  # mixes of K-quants: llama.cpp's llama-quantize writes them
_CONTROL, _USER_DEFINED, _NORMAL = 3, 4, 1  # gguf.TokenType values


def ggml_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def refuse_llama_quantize_only(type_name: str) -> None:
    """InputError for a type only llama-quantize writes, saying how to get it."""
    if type_name in LLAMA_QUANTIZE_ONLY:
        q = LLAMA_QUANTIZE_ONLY[type_name]
        raise InputError(f"--type {type_name}: the gguf Python package cannot write {q} (K-quant mixes are "
                         f"made by llama.cpp's quantizer); export --type f16 and run `llama-quantize "
                         f"model-f16.gguf model-{type_name}.gguf {q}`")


@dataclass
class TensorPlan:
    """One tensor of the file: its names, HF-layout shape, GGML type and why it is not the asked type."""

    name: str  # llama.cpp name
    hf_name: str | None  # None for tensors made here (rope_freqs)
    shape: tuple[int, ...]  # (rows, cols) as in PyTorch; GGUF stores it reversed
    qtype: object  # gguf.GGMLQuantizationType
    note: str | None = None

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def tensor_type(name: str, shape: tuple[int, ...], wanted: str, output_matrix: bool) -> tuple[object, str | None]:
    """(GGML type, note) of one tensor for ``--type wanted`` (see the module docstring for the rules).

    ``output_matrix``: this is the matrix that computes the logits (output.weight, or token_embd when tied).
    """
    import gguf

    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32, None
    qtype = ggml_type(GGUF_TYPES[wanted][0])
    note = None
    if wanted == "q4_0" and output_matrix:
        qtype, note = gguf.GGMLQuantizationType.Q8_0, "Q8_0 (llama-quantize gives the output matrix Q6_K)"
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        qtype, note = gguf.GGMLQuantizationType.F16, f"F16: rows of {shape[-1]} are not a multiple of {block}"
    return qtype, note


def llama3_rope_divisors(cfg: LlamaConfig) -> torch.Tensor:
    """llama.cpp's ``rope_freqs``: the divisor of each RoPE frequency under Llama-3 scaling, (hd/2,)."""
    s = cfg.rope_scaling
    dim = cfg.head_dim
    inv_freq = cfg.rope_theta ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * math.pi / inv_freq
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    scaled = 1.0 / ((1 - smooth) / s["factor"] + smooth)
    return torch.where(wavelen < high_wl, 1.0, torch.where(wavelen > low_wl, float(s["factor"]), scaled)).float()


def check_config(cfg: LlamaConfig) -> None:
    """Refuse what llama.cpp's llama architecture would compute differently."""
    if cfg.sliding_window is not None:
        raise InputError(f"sliding_window={cfg.sliding_window}: llama.cpp's llama architecture has no sliding "
                         "window attention; the GGUF would attend differently")


def add_llama_metadata(writer, cfg: LlamaConfig, file_type: int) -> None:
    import gguf

    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if cfg.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

@dataclass
class GGUFVocab:
    """The ``tokenizer.*`` fields of a byte-level BPE vocabulary."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int | None]  # bos, eos, unk, pad
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _template_adds(post: dict | None) -> tuple[bool, bool]:
    """(adds a token before, adds one after) a single sequence, per tokenizer.json's post-processor."""
    if post is None:
        return False, False
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            return bool(single) and "SpecialToken" in single[0], bool(single) and "SpecialToken" in single[-1]
    return False, False


def read_vocab(model_dir: Path, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of a model folder's tokenizer.json (byte-level BPE only)."""
    from models.tokenizer import load_tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{model_dir}: no tokenizer.json (the GGUF needs the tokenizer)")
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "byte-fallback BPE (SentencePiece style)" if model.get("byte_fallback") else repr(model.get("type"))
        raise InputError(f"{path}: tokenizer model {kind} is not supported: only byte-level BPE (GPT-2, "
                         "Llama 3, SmolLM2); convert this model with llama.cpp's convert_hf_to_gguf.py")
    try:
        pre = pre_tokenizer_name(tok.get("pre_tokenizer"))
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise InputError(f"{path}: token id {max(by_id)} is outside the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows without a token (vocab padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(_USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(_NORMAL if i not in added else _CONTROL if added[i].get("special") else _USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    loaded = load_tokenizer(model_dir)
    add_bos, add_eos = _template_adds(tok.get("post_processor"))
    pad = loaded.special_tokens.get("pad_token")  # only a declared one (pad_token_id falls back to eos)
    ids = {"bos": loaded.bos_token_id, "eos": loaded.eos_token_id, "unk": loaded.unk_token_id,
           "pad": loaded.token_to_id(pad) if pad is not None else None}
    return GGUFVocab(pre, tokens, types, merges, ids, add_bos, add_eos, loaded.chat_template)


def add_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
               "pad": writer.add_pad_token_id}
    for key, tid in vocab.special_ids.items():
        if tid is not None:
            setters[key](tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

def plan_tensors(cfg: LlamaConfig, hf_shapes: dict[str, tuple[int, ...]], wanted: str) -> list[TensorPlan]:
    """The file's tensors in HF order (``hf_shapes``: `models.loading.expected_tensors`)."""
    import gguf

    plans = []
    if cfg.rope_type == "llama3":
        plans.append(TensorPlan("rope_freqs.weight", None, (cfg.head_dim // 2,), gguf.GGMLQuantizationType.F32))
    logits_matrix = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    for hf_name, shape in hf_shapes.items():
        name = gguf_tensor_name(hf_name)
        qtype, note = tensor_type(name, shape, wanted, hf_name == logits_matrix)
        plans.append(TensorPlan(name, hf_name, tuple(shape), qtype, note))
    return plans


def gguf_layout(hf_name: str, w: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """An HF tensor in llama.cpp's layout: q/k rows (weights and biases) permuted per head."""
    if ".self_attn.q_proj." in hf_name:
        return permute_qk(w, cfg.num_attention_heads)
    if ".self_attn.k_proj." in hf_name:
        return permute_qk(w, cfg.num_key_value_heads)
    return w


def encode_tensor(w: torch.Tensor, qtype) -> np.ndarray:
    """The bytes (or F32/F16 values) GGUF stores for ``w`` as ``qtype``."""
    from gguf.quants import quantize

    return quantize(np.ascontiguousarray(w.detach().float().cpu().numpy()), qtype)


def write_gguf(path: str | os.PathLike, metadata: Callable, plans: list[TensorPlan],
               tensors: Callable[[TensorPlan], torch.Tensor], progress: Callable[[Iterator], Iterator] = iter) -> None:
    """Write a GGUF: ``metadata(writer)`` adds the key/values, then each plan's tensor,
    ``tensors(plan)`` (HF layout, made on demand) is permuted, encoded and written in turn."""
    import gguf

    writer = gguf.GGUFWriter(None, "llama")
    metadata(writer)
    for p in plans:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file(Path(path))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in progress(plans):
        writer.write_tensor_data(encode_tensor(tensors(p), p.qtype))
    writer.close()


def model_tensor_source(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> Callable[[TensorPlan], torch.Tensor]:
    """``tensors(plan)`` for `write_gguf` from an HF-named state dict (rope_freqs made from the config)."""
    def tensor(plan: TensorPlan) -> torch.Tensor:
        if plan.hf_name is None:
            return llama3_rope_divisors(cfg)
        return gguf_layout(plan.hf_name, state[plan.hf_name], cfg)
    return tensor
