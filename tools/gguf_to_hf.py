"""Convert a llama-architecture GGUF file into an HF-style model folder.

    python -m tools.gguf_to_hf MODEL.gguf OUT_DIR [--dtype float32|bfloat16|float16]

Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards plus
``model.safetensors.index.json``), ``tokenizer.json`` and ``tokenizer_config.json``.

Weights. Every tensor is dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0 ... Q8_0,
the K-quants, the IQ types: whatever the installed ``gguf`` package handles) and renamed to the HF
name. GGUF lists dimensions fastest-first (``ne``), so a ``[in, out]`` GGUF shape is an HF
``(out, in)`` matrix (names: `models.gguf_map`). llama.cpp's HF→GGUF converter permutes the rows of ``q_proj`` and ``k_proj``
so that its interleaved RoPE (pairs ``(2i, 2i+1)``) computes what HF's half-rotation RoPE (pairs
``(i, i + hd/2)``) computes; `unpermute_qk` undoes that permutation exactly.

Tokenizer. ``tokenizer.json`` is built from the GGUF vocabulary (``tokenizer.ggml.*``): byte-level
BPE (``gpt2`` model) with the pre-tokenizer that llama.cpp uses for ``tokenizer.ggml.pre``, and the
SentencePiece-style ``llama`` model as a byte-fallback BPE (as HF's ``LlamaTokenizerFast``).
CONTROL tokens become special added tokens, USER_DEFINED tokens plain added tokens.

The folder is written into a temporary sibling and renamed at the end: a failed conversion leaves
nothing half-written behind.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.errors import InputError, run_cli
from engine.atomic import atomic_dir
from models.gguf_map import PRE_TOKENIZERS, hf_tensor_name, permute_qk, unpermute_qk  # noqa: F401 (re-exported)
from models.safetensors_io import save_safetensors

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_SHARD_BYTES = 4 * 1024**3

# Tensors that carry no weights of the HF model (RoPE frequencies are recomputed from the config).
_SKIPPED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def read_fields(reader) -> dict:
    """All metadata key/values of a ``gguf.GGUFReader`` as plain Python values."""
    return {key: field.contents() for key, field in reader.fields.items()}


def _rope_scaling(meta: dict, reader) -> dict | None:
    """HF ``rope_scaling`` from GGUF: linear scaling is a metadata field; Llama-3 scaling is baked
    into a ``rope_freqs`` tensor of per-frequency divisors, from which the standard llama3
    parameters are recovered and checked."""
    kind = meta.get("llama.rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    if kind not in (None, "none"):
        raise InputError(f"rope scaling type {kind!r} is not supported (only linear and llama3)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    return _llama3_scaling(np.asarray(freqs.data, dtype=np.float64), meta)


def _llama3_scaling(divisors: np.ndarray, meta: dict) -> dict:
    """Fit llama3 rope parameters to the divisor tensor (Llama 3.1/3.2 use low=1, high=4,
    original context 8192 and a factor equal to the largest divisor)."""
    dim = divisors.shape[0] * 2
    base = float(meta["llama.rope.freq_base"])
    inv_freq = base ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    params = {"factor": float(divisors.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    wavelen = 2 * math.pi / inv_freq
    low_wl = params["original_max_position_embeddings"] / params["low_freq_factor"]
    high_wl = params["original_max_position_embeddings"] / params["high_freq_factor"]
    smooth = (params["original_max_position_embeddings"] / wavelen - params["low_freq_factor"]) / (
        params["high_freq_factor"] - params["low_freq_factor"])
    scaled = 1.0 / ((1 - smooth) / params["factor"] + smooth)  # divisor in the smooth band
    expected = np.where(wavelen < high_wl, 1.0, np.where(wavelen > low_wl, params["factor"], scaled))
    if not np.allclose(expected, divisors, rtol=1e-3):
        raise InputError("rope_freqs.weight does not match llama3 rope scaling (low 1, high 4, original 8192)")
    return {"rope_type": "llama3", **params}


def _get(meta: dict, key: str, default=None, required: bool = False):
    if key not in meta:
        if required:
            raise InputError(f"GGUF metadata key {key!r} is missing")
        return default
    return meta[key]


def hf_config(meta: dict, reader, tensor_names: set[str], dtype: torch.dtype) -> dict:
    """The HF ``config.json`` of a llama-architecture GGUF."""
    arch = _get(meta, "general.architecture", required=True)
    if arch != "llama":
        raise InputError(f"GGUF architecture is {arch!r}; only 'llama' is supported")
    hidden = int(_get(meta, "llama.embedding_length", required=True))
    n_heads = int(_get(meta, "llama.attention.head_count", required=True))
    vocab = _get(meta, "llama.vocab_size") or len(_get(meta, "tokenizer.ggml.tokens", required=True))
    token_ids = {k: _get(meta, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_get(meta, "llama.feed_forward_length", required=True)),
        "num_hidden_layers": int(_get(meta, "llama.block_count", required=True)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_get(meta, "llama.attention.head_count_kv", n_heads)),
        "head_dim": int(_get(meta, "llama.attention.key_length", hidden // n_heads)),
        "max_position_embeddings": int(_get(meta, "llama.context_length", 4096)),
        # GGUF stores eps as float32 (1e-5 reads back as 9.99999974e-06): keep 6 significant digits.
        "rms_norm_eps": float(f"{float(_get(meta, 'llama.attention.layer_norm_rms_epsilon', 1e-5)):.6g}"),
        "rope_theta": float(_get(meta, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, reader),
        "vocab_size": int(vocab),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": token_ids["bos"],
        "eos_token_id": token_ids["eos"],
        "pad_token_id": token_ids["padding"],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _hf_tensor(t, cfg: dict, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize one GGUF tensor into its HF layout and dtype."""
    from gguf.quants import dequantize

    try:
        values = dequantize(t.data, t.tensor_type)
    except NotImplementedError as err:
        raise InputError(f"tensor {t.name!r}: {err}") from None
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF ne order is fastest-first
    w = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: GGUF data is a read-only mmap
    kind = t.name.split(".")[-2]
    if kind == "attn_q":
        w = unpermute_qk(w, cfg["num_attention_heads"])
    elif kind == "attn_k":
        w = unpermute_qk(w, cfg["num_key_value_heads"])
    return w.to(dtype).contiguous()


def _plan_shards(tensors, dtype: torch.dtype) -> list[list]:
    """Group tensors into shards of at most ``_MAX_SHARD_BYTES`` (in file order)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, size = [[]], 0
    for t in tensors:
        nbytes = int(np.prod([int(d) for d in t.shape])) * itemsize
        if shards[-1] and size + nbytes > _MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def write_weights(reader, cfg: dict, out: Path, dtype: torch.dtype) -> None:
    """Dequantize, rename and save every tensor: one ``model.safetensors``, or shards and an index."""
    tensors = [t for t in reader.tensors if t.name not in _SKIPPED]
    shards = _plan_shards(tensors, dtype)
    weight_map = {}
    with tqdm(total=len(tensors), desc="tensors", unit="tensor") as bar:
        for i, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            state = {}
            for t in shard:
                state[hf_tensor_name(t.name)] = _hf_tensor(t, cfg, dtype)
                weight_map[hf_tensor_name(t.name)] = name
                bar.update()
            save_safetensors(state, out / name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.json and tokenizer_config.json from the GGUF vocabulary.
# ---------------------------------------------------------------------------------------------

_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


@dataclass
class TokenizerFiles:
    """``tokenizer_json``: the text of tokenizer.json; ``tokenizer_config``: tokenizer_config.json."""

    tokenizer_json: str
    tokenizer_config: dict


def _check_per_token(key: str, values, tokens: list[str]) -> None:
    if len(values) != len(tokens):
        raise InputError(f"GGUF metadata {key!r} has {len(values)} entries for {len(tokens)} tokens")


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict]:
    """CONTROL tokens are special (skipped by decode(skip_special_tokens)), USER_DEFINED are not;
    both are matched verbatim in the raw text (normalized False), as llama.cpp stores them raw."""
    return [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": kind == _CONTROL}
        for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)) if kind in (_CONTROL, _USER_DEFINED)
    ]


def _template_processor(tokens: list[str], bos: int | None, eos: int | None) -> dict:
    """Post-processor adding ``bos`` before / ``eos`` after a sequence (None: not added)."""
    single, pair, special = [], [], {}
    for tid in (bos, eos):
        if tid is None:
            continue
        special[tokens[tid]] = {"id": tokens[tid], "ids": [tid], "tokens": [tokens[tid]]}
    piece = lambda tid, seq: {"SpecialToken": {"id": tokens[tid], "type_id": seq}}  # noqa: E731
    seq = lambda name, type_id: {"Sequence": {"id": name, "type_id": type_id}}  # noqa: E731
    for name, type_id, target in (("A", 0, single), ("A", 0, pair), ("B", 1, pair)):
        target += ([piece(bos, type_id)] if bos is not None else []) + [seq(name, type_id)]
        target += [piece(eos, type_id)] if eos is not None else []
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}


def _gpt2_model(meta: dict, tokens: list[str]) -> dict:
    """Byte-level BPE pieces of tokenizer.json for ``tokenizer.ggml.model == 'gpt2'``."""
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(PRE_TOKENIZERS))}")
    pre_tokenizers, ignore_merges = PRE_TOKENIZERS[pre]
    merges = [m.split(" ", 1) for m in _get(meta, "tokenizer.ggml.merges", required=True)]
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": ignore_merges, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}
    return {"normalizer": None,
            "pre_tokenizer": pre_tokenizers[0] if len(pre_tokenizers) == 1 else
            {"type": "Sequence", "pretokenizers": pre_tokenizers},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": model}


def _spm_merges(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary: every split of a piece into two
    pieces of the vocabulary is a merge, ranked by the merged piece's score (higher first), ties by
    the ids of its halves — the order HF's SentencePiece converter produces."""
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores, strict=True):
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        local.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        merges += [(score, left, right) for left, right in local]
    merges.sort(key=lambda m: -m[0])  # stable: keeps the per-piece order among equal scores
    return [[left, right] for _, left, right in merges]


def _llama_spm_model(meta: dict, tokens: list[str]) -> dict:
    """Pieces of tokenizer.json for ``tokenizer.ggml.model == 'llama'`` (SentencePiece BPE with byte
    fallback, Llama-2 / TinyLlama / Mistral): the layout of HF's LlamaTokenizerFast (legacy)."""
    scores = _get(meta, "tokenizer.ggml.scores", required=True)
    _check_per_token("tokenizer.ggml.scores", scores, tokens)
    unk = _get(meta, "tokenizer.ggml.unknown_token_id", 0)
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizers = ([{"type": "Prepend", "prepend": "▁"}] if add_prefix else [])
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if add_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    model = {"type": "BPE", "dropout": None, "unk_token": tokens[unk], "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
             "vocab": {t: i for i, t in enumerate(tokens)}, "merges": _spm_merges(tokens, scores)}
    return {"normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
            "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}


def build_tokenizer(meta: dict) -> TokenizerFiles:
    """tokenizer.json and tokenizer_config.json from the ``tokenizer.*`` GGUF metadata."""
    from tokenizers import Tokenizer

    kind = _get(meta, "tokenizer.ggml.model", required=True)
    tokens = list(_get(meta, "tokenizer.ggml.tokens", required=True))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    _check_per_token("tokenizer.ggml.token_type", types, tokens)
    if kind == "gpt2":
        parts, add_bos_default = _gpt2_model(meta, tokens), False
    elif kind == "llama":
        parts, add_bos_default = _llama_spm_model(meta, tokens), True
    else:
        raise InputError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    post = _template_processor(tokens, ids["bos"] if add_bos else None, ids["eos"] if add_eos else None)
    tok_json = {"version": "1.0", "truncation": None, "padding": None,
                "added_tokens": _added_tokens(tokens, types), **parts, "post_processor": post}
    text = json.dumps(tok_json, ensure_ascii=False)
    Tokenizer.from_str(text)  # validate now rather than at load time

    def name(key):
        return tokens[ids[key]] if ids[key] is not None else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": name("bos"),
        "eos_token": name("eos"),
        "unk_token": name("unknown"),
        "pad_token": name("padding"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 4096)),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return TokenizerFiles(text, config)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _convert(reader, out_dir: Path, dtype: torch.dtype) -> None:
    """Check everything (tensor names, config, tokenizer) before anything is written, then write."""
    meta = read_fields(reader)
    names = {t.name for t in reader.tensors}
    for name in names - _SKIPPED:
        hf_tensor_name(name)  # refuse foreign tensors before any work is done
    cfg = hf_config(meta, reader, names, dtype)
    tok = build_tokenizer(meta)
    with atomic_dir(out_dir) as tmp:
        _write_json(tmp / "config.json", cfg)
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
        _write_json(tmp / "generation_config.json", gen)
        (tmp / "tokenizer.json").write_text(tok.tokenizer_json, encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", tok.tokenizer_config)
        write_weights(reader, cfg, tmp, dtype)


def convert_gguf(gguf_path, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Convert ``gguf_path`` into the HF folder ``out_dir`` (replaced if it exists); return it."""
    import gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise InputError(f"{gguf_path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, OSError) as err:
        raise InputError(f"{gguf_path}: not a readable GGUF file ({err})") from None
    try:
        _convert(reader, out_dir, dtype)
    except InputError as err:  # the messages below name the key or tensor; add the file
        raise InputError(f"{gguf_path}: {err}") from None
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gguf_to_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", help="a llama-architecture .gguf file")
    parser.add_argument("out_dir", help="folder to write (replaced if it exists)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the saved weights")
    args = parser.parse_args(argv)
    print(convert_gguf(args.gguf, args.out_dir, _DTYPES[args.dtype]))
    return 0


if __name__ == "__main__":
    run_cli(main)
