"""tools.gguf_to_hf: q/k permutation, exact conversion of a hand-made GGUF, the SmolLM2 fixture."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from engine.errors import InputError
from tools.gguf_to_hf import convert_gguf, hf_tensor_name, main, permute_qk, unpermute_qk

Q8 = gguf.GGMLQuantizationType.Q8_0


# ---------------------------------------------------------------- q/k permutation


@pytest.mark.parametrize("n_heads,head_dim,cols", [(1, 2, 1), (3, 64, 5), (9, 64, 7), (4, 6, 3)])
def test_unpermute_inverts_permute(n_heads, head_dim, cols):
    w = torch.randn(n_heads * head_dim, cols)
    assert torch.equal(permute_qk(unpermute_qk(w, n_heads), n_heads), w)
    assert torch.equal(unpermute_qk(permute_qk(w, n_heads), n_heads), w)
    bias = torch.randn(n_heads * head_dim)
    assert torch.equal(unpermute_qk(permute_qk(bias, n_heads), n_heads), bias)


def _rope_half(x, pos, theta):
    """HF layout: pairs (i, i + hd/2) rotate by pos * theta**(-2i/hd). x: (T, hd)."""
    hd = x.shape[-1]
    angle = pos[:, None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    rotated = torch.cat([-x[:, hd // 2:], x[:, : hd // 2]], -1)
    return x * cos + rotated * sin


def _rope_interleaved(x, pos, theta):
    """llama.cpp layout: pairs (2i, 2i+1) rotate by the same angles. x: (T, hd)."""
    hd = x.shape[-1]
    angle = pos[:, None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    even, odd = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = even * angle.cos() - odd * angle.sin()
    out[:, 1::2] = even * angle.sin() + odd * angle.cos()
    return out


@pytest.mark.parametrize("n_heads,head_dim", [(3, 8), (2, 64)])
def test_permutation_makes_interleaved_rope_equal_half_rope(n_heads, head_dim):
    """The reason for the permutation: GGUF weights under interleaved RoPE give the same attention
    scores as HF weights under half-rotation RoPE; so unpermute_qk is the right inverse."""
    hidden, T = 11, 5
    w_hf = torch.randn(n_heads * head_dim, hidden, dtype=torch.float64)
    x = torch.randn(T, hidden, dtype=torch.float64)
    pos = torch.arange(T, dtype=torch.float64)
    heads_hf = (x @ w_hf.T).view(T, n_heads, head_dim)
    heads_gguf = (x @ permute_qk(w_hf, n_heads).T).view(T, n_heads, head_dim)
    for h in range(n_heads):
        a, b = _rope_half(heads_hf[:, h], pos, 1e4), _rope_interleaved(heads_gguf[:, h], pos, 1e4)
        torch.testing.assert_close(a @ a.T, b @ b.T)  # q·k scores are layout independent


def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(InputError, match="blk.0.ffn_gate_exps.weight"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


# ---------------------------------------------------------------- a tiny hand-made GGUF

TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "Ġ", "1", "2", "ab", "Ġab", "<tool>"]
TYPES = [3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 4]
MERGES = ["a b", "Ġ ab"]
DIMS = dict(hidden=64, n_heads=4, n_kv=2, ffn=96, vocab=len(TOKENS))


def _q8_reference(x: np.ndarray) -> np.ndarray:
    """Q8_0 by hand (ggml's reference): blocks of 32 along a row, d = max|x| / 127,
    q = round-half-away(x * (1/d)) in int8, value = q * fp16(d)."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    scaled = blocks * inv
    q = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def _tiny_weights(rng, untied: bool) -> dict[str, np.ndarray]:
    """HF-layout weights of a one-layer model; Q8-able matrices have rows that are multiples of 32."""
    H, hd, F, V = DIMS["hidden"], DIMS["hidden"] // DIMS["n_heads"], DIMS["ffn"], DIMS["vocab"]
    w = {
        "model.embed_tokens.weight": rng.standard_normal((V, H)),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((DIMS["n_heads"] * hd, H)),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((DIMS["n_kv"] * hd, H)),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((DIMS["n_kv"] * hd, H)),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((H, H)),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((F, H)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((F, H)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((H, F)),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(H),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(H),
        "model.norm.weight": rng.standard_normal(H),
    }
    if untied:
        w["lm_head.weight"] = rng.standard_normal((V, H))
    return {k: v.astype(np.float32) for k, v in w.items()}


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    **{f"model.layers.0.{hf}.weight": f"blk.0.{gg}.weight" for gg, hf in [
        ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm")]},
}


def write_tiny_gguf(path: Path, weights: dict, q8: set[str], pre: str = "smollm", extra_tensors=()) -> None:
    """A llama GGUF holding ``weights`` (HF layout; q/k permuted as llama.cpp does), the names in
    ``q8`` stored as Q8_0 and the rest as F32, with a tiny byte-level BPE vocabulary."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(DIMS["hidden"])
    writer.add_feed_forward_length(DIMS["ffn"])
    writer.add_head_count(DIMS["n_heads"])
    writer.add_head_count_kv(DIMS["n_kv"])
    writer.add_rope_freq_base(5e5)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types(TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    for hf_name, value in weights.items():
        if hf_name.endswith("q_proj.weight"):
            value = permute_qk(torch.from_numpy(value), DIMS["n_heads"]).numpy()
        elif hf_name.endswith("k_proj.weight"):
            value = permute_qk(torch.from_numpy(value), DIMS["n_kv"]).numpy()
        if hf_name in q8:
            writer.add_tensor(_GGUF_NAMES[hf_name], gguf.quants.quantize(value, Q8),
                              raw_dtype=Q8)
        else:
            writer.add_tensor(_GGUF_NAMES[hf_name], value)
    for name, value in extra_tensors:
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


Q8_NAMES = {"model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"}


@pytest.mark.parametrize("untied", [False, True])
def test_tiny_gguf_converts_to_exact_values(tmp_path, untied):
    weights = _tiny_weights(np.random.default_rng(0), untied)
    write_tiny_gguf(tmp_path / "tiny.gguf", weights, Q8_NAMES)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")

    state = load_file(out / "model.safetensors")
    assert set(state) == set(weights)
    for name, value in weights.items():
        expected = _q8_reference(value) if name in Q8_NAMES else value
        assert state[name].dtype == torch.float32 and state[name].shape == value.shape, name
        assert torch.equal(state[name], torch.from_numpy(expected)), name

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is (not untied)
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (64, 4, 2)
    assert (cfg["head_dim"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (16, 96, 1)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (5e5, 1e-6, 128)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (1, 2, len(TOKENS))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not list(tmp_path.glob(".hf.*")), "temporary folder left behind"


def test_tiny_gguf_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", _tiny_weights(np.random.default_rng(1), False), set())
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", dtype=torch.bfloat16)
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("ab ab12<|im_end|>a<tool>")
    assert enc.tokens == ["ab", "Ġab", "1", "2", "<|im_end|>", "a", "<tool>"]
    assert tok.decode(enc.ids, skip_special_tokens=True) == "ab ab12a<tool>"  # USER_DEFINED is not special
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"], cfg["add_bos_token"]) == (
        "<|im_start|>", "<|im_end|>", None, False)
    assert cfg["chat_template"] == "{{ messages[0]['content'] }}"


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="no such GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(InputError, match="junk.gguf"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out")
    weights = _tiny_weights(np.random.default_rng(2), False)
    write_tiny_gguf(tmp_path / "pre.gguf", weights, set(), pre="qwen2")
    with pytest.raises(InputError, match="pre-tokenizer 'qwen2'"):
        convert_gguf(tmp_path / "pre.gguf", tmp_path / "out")
    write_tiny_gguf(tmp_path / "moe.gguf", weights, set(), extra_tensors=[("blk.0.ffn_gate_inp.weight", np.ones((2, 64), np.float32))])
    with pytest.raises(InputError, match="ffn_gate_inp"):
        convert_gguf(tmp_path / "moe.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        from engine.errors import run_cli

        run_cli(main, [str(tmp_path / "nope.gguf"), str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert capsys.readouterr().err.strip().count("\n") == 0


# ---------------------------------------------------------------- the SmolLM2 fixture


def test_fixture_tensors_and_config(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 1e5 and cfg["rms_norm_eps"] == 1e-5
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert len(shapes) == 2 + 30 * 9 and "lm_head.weight" not in shapes
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.layers.29.self_attn.q_proj.weight"] == (576, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.layers.7.mlp.down_proj.weight"] == (576, 1536)
    assert shapes["model.norm.weight"] == (576,)
    # the fixture holds the GGUF's values: q un-permuted, the Q8_0 embedding dequantized
    from tools.fixtures import GGUF_MEMBER, cache_root

    reader = gguf.GGUFReader(str(cache_root() / GGUF_MEMBER))
    raw = {t.name: t for t in reader.tensors if t.name in ("blk.0.attn_q.weight", "token_embd.weight")}
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        embed_rows = f.get_slice("model.embed_tokens.weight")[:64]
    q_gguf = gguf.quants.dequantize(raw["blk.0.attn_q.weight"].data, raw["blk.0.attn_q.weight"].tensor_type)
    assert torch.equal(permute_qk(q, 9), torch.from_numpy(q_gguf))
    embed = gguf.quants.dequantize(raw["token_embd.weight"].data[:64], Q8)
    assert torch.equal(embed_rows, torch.from_numpy(embed))


def test_sentencepiece_vocab_matches_transformers_gguf_tokenizer(tmp_path):
    """tokenizer.ggml.model 'llama' (Llama-2/TinyLlama): byte-fallback BPE with merges from scores.
    Oracle: transformers' own GGUF tokenizer converter, on texts where HF's legacy (ours, as in the
    Llama-2 hub tokenizer.json and llama.cpp) and non-legacy space handling agree."""
    from transformers import AutoTokenizer

    from models.tokenizer import load_tokenizer

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [
        "▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc", "▁b", "abc"]
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for add, value in [(writer.add_block_count, 1), (writer.add_embedding_length, DIMS["hidden"]),
                       (writer.add_feed_forward_length, DIMS["ffn"]), (writer.add_head_count, DIMS["n_heads"]),
                       (writer.add_head_count_kv, DIMS["n_kv"]), (writer.add_tokenizer_model, "llama"),
                       (writer.add_token_list, tokens), (writer.add_token_types, [2, 3, 3] + [6] * 256 + [1] * 10),
                       (writer.add_token_scores, [0.0] * 259 + [-float(i) for i in range(10)]),
                       (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2), (writer.add_unk_token_id, 0)]:
        add(value)
    weights = _tiny_weights(np.random.default_rng(3), False)
    weights["model.embed_tokens.weight"] = np.zeros((len(tokens), DIMS["hidden"]), np.float32)
    for name, value in weights.items():
        writer.add_tensor(_GGUF_NAMES[name], value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = load_tokenizer(convert_gguf(tmp_path / "spm.gguf", tmp_path / "hf"))
    oracle = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["abc ab a", "xyz é 1", "a\nb", "", "cab abc", "bcab  a"]:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == oracle(text)["input_ids"], repr(text)
        assert ours.decode(ids, skip_special_tokens=True) == text
