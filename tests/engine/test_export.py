"""engine.export gguf: the merged model and the LoRA GGUF, read back by tools.gguf_to_hf and by gguf's reader.

A tiny random Llama (hidden 64, GQA 4/2, 2 blocks, ffn 80: down_proj rows of 80 are not a multiple
of Q8_0's block of 32) with the real SmolLM2 tokenizer; weights of magnitude ~1 so that logit
tolerances mean something.
"""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import models
from engine.adapters import LoRAConfig, inject_lora, load_adapter, merge, save_adapter
from engine.adapters.lora import lora_scale
from engine.errors import InputError, run_cli
from engine.export import export_lora, export_model, main
from models.config import LlamaConfig
from models.gguf_map import (
    PRE_TOKENIZERS,
    gguf_tensor_name,
    hf_tensor_name,
    pre_tokenizer_name,
    unpermute_qk,
)
from models.gguf_writer import read_vocab
from models.loading import expected_tensors, save_model
from tests.tolerances import assert_close
from tests.tools.test_gguf_to_hf import _q8_reference
from tools.gguf_to_hf import convert_gguf

QT = gguf.GGMLQuantizationType
PROMPT = torch.tensor([[1, 520, 3387, 30, 17, 4400, 2, 98, 12000, 5]])


def _config(tie: bool, **changes) -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                       **changes)


def _write_model(out: Path, cfg: LlamaConfig, smollm2_dir: Path) -> Path:
    torch.manual_seed(0)
    model = models.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
    save_model(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(smollm2_dir / name, out / name)
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model_dir(request, tmp_path_factory, smollm2_dir):
    return _write_model(tmp_path_factory.mktemp("model"), _config(request.param), Path(smollm2_dir))


def _adapter(model_dir: Path, out: Path, seed: int, **lora) -> Path:
    torch.manual_seed(seed)
    model = models.load_model(model_dir)
    cfg = LoRAConfig(**{"r": 4, "alpha": 8, "target_modules": ("q_proj", "k_proj", "v_proj", "down_proj"), **lora})
    inject_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    return save_adapter(model, cfg, out, str(model_dir))


def _logits(folder: Path, adapters=()) -> torch.Tensor:
    model = models.load_model(folder, dtype=torch.float32)
    for a in adapters:
        load_adapter(model, a)
    with torch.no_grad():
        return model(PROMPT)[0]


def _tensor_types(path: Path) -> dict[str, QT]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}


# ---------------------------------------------------------------- the maps, both ways


def test_tensor_names_both_ways():
    for tie in (True, False):
        for name in expected_tensors(_config(tie, attention_bias=True)):
            assert hf_tensor_name(gguf_tensor_name(name)) == name
    assert gguf_tensor_name("model.layers.7.self_attn.q_proj.weight") == "blk.7.attn_q.weight"
    assert gguf_tensor_name("lm_head.weight") == "output.weight"
    with pytest.raises(InputError, match="score.weight"):
        gguf_tensor_name("score.weight")


def test_pre_tokenizer_names_both_ways():
    for name, (steps, _) in PRE_TOKENIZERS.items():
        pre = steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}
        assert PRE_TOKENIZERS[pre_tokenizer_name(pre)][0] == steps, name  # a name that splits alike
    assert pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    with pytest.raises(InputError, match="Metaspace"):
        pre_tokenizer_name({"type": "Metaspace"})


def test_vocab_matches_llama_cpp_conversion_of_smollm2(smollm2_dir):
    """Oracle: the SmolLM2 GGUF llama.cpp's converter wrote (our fixture's source)."""
    from tools.fixtures import GGUF_MEMBER, cache_root

    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(cache_root() / GGUF_MEMBER)).fields.items()
            if k.startswith("tokenizer.")}
    vocab = read_vocab(Path(smollm2_dir), 49152)
    assert vocab.pre == meta["tokenizer.ggml.pre"] == "smollm"
    assert vocab.tokens == meta["tokenizer.ggml.tokens"]
    assert vocab.types == meta["tokenizer.ggml.token_type"]
    assert vocab.merges == meta["tokenizer.ggml.merges"]
    assert vocab.special_ids == {k: meta[f"tokenizer.ggml.{g}_token_id"] for k, g in
                                 [("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")]}
    assert vocab.add_bos is meta["tokenizer.ggml.add_bos_token"] is False
    assert vocab.chat_template == meta["tokenizer.chat_template"]


def test_llama3_style_tokenizer_and_padded_vocab(tmp_path, smollm2_dir):
    """A Llama-3 pre-tokenizer and a post-processor that adds BOS: named and flagged so, and the
    tokenizer rebuilt from those fields (tools.gguf_to_hf) encodes as the source; embedding rows
    past the tokenizer's last id become [PADi] tokens."""
    from models.gguf_map import LLAMA3_REGEX
    from models.gguf_writer import GGUFVocab, add_vocab
    from tools.gguf_to_hf import build_tokenizer, read_fields

    folder = tmp_path / "tok"
    folder.mkdir()
    tok = json.loads((Path(smollm2_dir) / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok["model"]["ignore_merges"] = True
    tok["post_processor"] = {"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    shutil.copy(Path(smollm2_dir) / "tokenizer_config.json", folder / "tokenizer_config.json")
    vocab = read_vocab(folder, 49160)
    assert isinstance(vocab, GGUFVocab) and (vocab.pre, vocab.add_bos, vocab.add_eos) == ("llama-bpe", True, False)
    assert vocab.tokens[49152:] == [f"[PAD{i}]" for i in range(49152, 49160)] and vocab.types[49159] == 4

    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    add_vocab(writer, vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    rebuilt = build_tokenizer(read_fields(gguf.GGUFReader(str(tmp_path / "t.gguf"))))
    (tmp_path / "back").mkdir()
    (tmp_path / "back" / "tokenizer.json").write_text(rebuilt.tokenizer_json)
    (tmp_path / "back" / "tokenizer_config.json").write_text(json.dumps(rebuilt.tokenizer_config))
    source, back = models.load_tokenizer(folder), models.load_tokenizer(tmp_path / "back")
    for text in ["Hello world 12345!", "don't  stop\n\nnow", "  tabs\tand émojis 🙂"]:
        assert back.encode(text, add_special_tokens=True) == source.encode(text, add_special_tokens=True), text
        assert source.encode(text, add_special_tokens=True)[0] == 1


# ---------------------------------------------------------------- merged model


def test_f32_with_two_adapters_reads_back_exactly(model_dir, tmp_path):
    a1, a2 = _adapter(model_dir, tmp_path / "a1", 1), _adapter(model_dir, tmp_path / "a2", 2, r=2,
                                                               target_modules=("o_proj", "up_proj"))
    out = tmp_path / "m.gguf"
    export_model(str(model_dir), [str(a1), str(a2)], out, "f32")
    expected = models.load_model(model_dir)
    for a in (a1, a2):
        load_adapter(expected, a)
        merge(expected, torch.float32)
    back = models.load_model(convert_gguf(out, tmp_path / "hf"))
    got, want = back.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    types = _tensor_types(out)
    assert ("output.weight" in types) is (not expected.config.tie_word_embeddings)
    assert types["blk.0.attn_norm.weight"] == QT.F32 and types["blk.0.attn_q.weight"] == QT.F32
    assert not list(tmp_path.glob(".m.gguf.tmp-*"))


def test_nf4_base_merges_as_engine_merge_does(model_dir, tmp_path):
    """--quant nf4 (a QLoRA adapter): the GGUF holds what ``engine.merge --quant nf4`` writes."""
    from engine.merge import merge_to_folder

    adapter = _adapter(model_dir, tmp_path / "a", 8)
    export_model(str(model_dir), [str(adapter)], tmp_path / "m.gguf", "f32", quant="nf4")
    merge_to_folder(str(model_dir), str(adapter), tmp_path / "merged", torch.float32, quant="nf4")
    got = models.load_model(convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")).state_dict()
    want = models.load_model(tmp_path / "merged").state_dict()
    plain = models.load_model(model_dir).state_dict()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], plain["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("type_name,qtype,dtype", [("f16", QT.F16, torch.float16), ("bf16", QT.BF16, torch.bfloat16)])
def test_half_types_hold_the_rounded_weights(model_dir, tmp_path, type_name, qtype, dtype):
    out = tmp_path / "m.gguf"
    export_model(str(model_dir), [], out, type_name)
    types = _tensor_types(out)
    assert types["blk.1.ffn_down.weight"] == qtype and types["token_embd.weight"] == qtype
    assert types["output_norm.weight"] == QT.F32 and types["blk.1.ffn_norm.weight"] == QT.F32
    back = models.load_model(convert_gguf(out, tmp_path / "hf")).state_dict()
    for name, w in models.load_model(model_dir).state_dict().items():
        assert torch.equal(back[name], w if w.ndim == 1 else w.to(dtype).float()), name
    if type_name == "f16":
        source = _logits(model_dir)
        assert source.abs().max() > 2  # the tolerance below is small against these logits
        assert_close(_logits(tmp_path / "hf"), source, atol=1e-2, rtol=0, name="F16 logits")


def _dequantized(w: torch.Tensor, qtype: QT) -> torch.Tensor:
    """What a ``qtype`` GGUF tensor holds for ``w``: Q8_0 by hand (tests/tools' reference), else gguf-py's."""
    if qtype == QT.Q8_0:
        return torch.from_numpy(_q8_reference(w.numpy()))
    if qtype == QT.F16:
        return w.half().float()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)).reshape(w.shape)


def test_q8_0_and_q4_0(model_dir, tmp_path, capsys):
    """Each tensor holds its quantized values (blocks run along rows, so the q/k row permutation
    commutes with quantization); logits stay near the source's (max |logit| ~4 here)."""
    source_model = models.load_model(model_dir)
    tied = source_model.config.tie_word_embeddings
    source = _logits(model_dir)
    for type_name, qtype, atol in [("q8_0", QT.Q8_0, 0.15), ("q4_0", QT.Q4_0, 2.0)]:
        out = tmp_path / f"{type_name}.gguf"
        export_model(str(model_dir), [], out, type_name)
        types = _tensor_types(out)
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == qtype
        assert types["blk.0.ffn_down.weight"] == QT.F16  # rows of 80: not whole blocks of 32
        assert types["blk.0.attn_norm.weight"] == QT.F32
        logits_matrix = "token_embd.weight" if tied else "output.weight"
        assert types[logits_matrix] == (QT.Q8_0 if type_name == "q4_0" else qtype)
        if not tied:
            assert types["token_embd.weight"] == qtype
        assert "blk.0.ffn_down.weight: F16: rows of 80 are not a multiple of 32" in capsys.readouterr().out
        back = models.load_model(convert_gguf(out, tmp_path / f"{type_name}-hf"))
        got_state = back.state_dict()
        for name, shape in expected_tensors(source_model.config).items():
            w = source_model.state_dict()[name]
            if len(shape) == 2:
                assert torch.equal(got_state[name], _dequantized(w, types[gguf_tensor_name(name)])), name
        with torch.no_grad():
            assert_close(back(PROMPT)[0], source, atol=atol, rtol=0, name=f"{type_name} logits")


def test_metadata(model_dir, tmp_path, smollm2_dir):
    out = tmp_path / "m.gguf"
    export_model(str(model_dir), [], out, "q8_0")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
    expected = {
        "general.architecture": "llama", "general.file_type": 7, "llama.context_length": 256,
        "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 80,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": 16, "llama.vocab_size": 49152, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) == 48900
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    # and the tokenizer rebuilt from the GGUF tokenizes as the source
    back = models.load_tokenizer(convert_gguf(out, tmp_path / "hf"))
    source = models.load_tokenizer(smollm2_dir)
    for text in ["Hello world 12345!", "<|im_start|>user\nHi<|im_end|>\n", "  tabs\tand émojis 🙂"]:
        assert back.encode(text) == source.encode(text), text
    assert back.chat_template == source.chat_template


def test_llama3_rope_scaling_round_trip(tmp_path, smollm2_dir):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    folder = _write_model(tmp_path / "m", _config(True, rope_scaling=scaling), Path(smollm2_dir))
    export_model(str(folder), [], tmp_path / "m.gguf", "f32")
    assert _tensor_types(tmp_path / "m.gguf")["rope_freqs.weight"] == QT.F32
    hf = json.loads((convert_gguf(tmp_path / "m.gguf", tmp_path / "hf") / "config.json").read_text())
    assert hf["rope_scaling"] == scaling
    assert_close(_logits(tmp_path / "hf"), _logits(folder), atol=1e-4, rtol=0, name="llama3-rope logits")


# ---------------------------------------------------------------- LoRA GGUF


def _lora_back(path: Path, cfg: LlamaConfig) -> tuple[dict, dict]:
    """{module: (A (r, in), B (out, r))} in HF layout (B of q/k un-permuted), and the metadata."""
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    pairs = {}
    for t in reader.tensors:
        base, which = t.name.rsplit(".", 1)
        module = hf_tensor_name(base).removesuffix(".weight")
        value = torch.from_numpy(np.array(t.data, dtype=np.float32))  # numpy shape = reversed GGUF ne
        assert tuple(t.shape) == tuple(reversed(value.shape))
        if which == "lora_b" and module.endswith("q_proj"):
            value = unpermute_qk(value, cfg.num_attention_heads)
        elif which == "lora_b" and module.endswith("k_proj"):
            value = unpermute_qk(value, cfg.num_key_value_heads)
        pairs.setdefault(module, {})["lora_A" if which == "lora_a" else "lora_B"] = value
    return pairs, meta


def test_lora_only_reproduces_the_adapter(model_dir, tmp_path):
    adapter = _adapter(model_dir, tmp_path / "a", 3)
    lora = export_lora(str(model_dir), str(adapter), tmp_path / "a.gguf", "f32")
    assert not lora.rescaled
    cfg = models.load_model(model_dir).config
    pairs, meta = _lora_back(tmp_path / "a.gguf", cfg)
    assert (meta["general.type"], meta["adapter.type"], meta["general.architecture"]) == ("adapter", "lora", "llama")
    assert meta["adapter.lora.alpha"] == 8.0
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 4)  # ne [in, r]
    assert shapes["blk.0.attn_q.weight.lora_b"] == (4, 64)  # ne [r, out]
    assert shapes["blk.1.attn_k.weight.lora_b"] == (4, 32) and shapes["blk.1.ffn_down.weight.lora_a"] == (80, 4)
    model = models.load_model(model_dir)
    load_adapter(model, adapter)
    from engine.adapters import lora_modules

    ours = lora_modules(model)
    assert set(pairs) == set(ours)
    for name, m in ours.items():
        assert torch.equal(pairs[name]["lora_A"], m.lora_A.detach()), name
        assert torch.equal(pairs[name]["lora_B"], m.lora_B.detach()), name


def test_lora_only_rescales_b_for_one_alpha(model_dir, tmp_path):
    adapter = _adapter(model_dir, tmp_path / "a", 4, use_rslora=True, rank_pattern={"down_proj": 2},
                       alpha_pattern={"v_proj": 3.0})
    lora = export_lora(str(model_dir), str(adapter), tmp_path / "a.gguf", "f32")
    assert "B of 8 modules was scaled" in lora.summary()
    pairs, meta = _lora_back(tmp_path / "a.gguf", models.load_model(model_dir).config)
    model = models.load_model(model_dir)
    load_adapter(model, adapter)
    from engine.adapters import lora_modules

    for name, m in lora_modules(model).items():
        a, b = pairs[name]["lora_A"], pairs[name]["lora_B"]
        llama_cpp_delta = (meta["adapter.lora.alpha"] / a.shape[0]) * (b @ a)  # what llama.cpp applies
        assert_close(llama_cpp_delta, m.delta_weight(), name=name)
        assert m.scale == lora_scale(m.r, m.alpha, True)


# ---------------------------------------------------------------- bad input: exit 2, nothing written


def test_bad_inputs_exit_2_and_write_nothing(model_dir, tmp_path, capsys):
    a1, a2 = _adapter(model_dir, tmp_path / "a1", 5), _adapter(model_dir, tmp_path / "a2", 6)
    out = tmp_path / "x.gguf"
    cases = [
        (["--model", str(tmp_path / "missing"), "--out", str(out)], "missing"),
        (["--model", str(model_dir), "--adapter", str(a1), "--adapter", str(a2), "--lora-only", "--out", str(out)],
         "--lora-only writes one adapter"),
        (["--model", str(model_dir), "--type", "q4_k_m", "--out", str(out)], "llama-quantize"),
        (["--model", str(model_dir), "--adapter", str(tmp_path / "nope"), "--out", str(out)], "nope"),
        (["--model", str(model_dir), "--adapter", str(a1), "--lora-only", "--type", "q8_0", "--out", str(out)],
         "--lora-only"),
        (["--model", str(model_dir), "--out", str(tmp_path)], "is a folder"),
        (["--model", str(model_dir), "--adapter", str(a1), "--lora-only", "--quant", "nf4", "--out", str(out)],
         "--quant nf4 with --lora-only"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, ["gguf", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, args
        assert message in err and err.count("\n") == 1, err
        assert not out.exists() and not list(tmp_path.glob(".x.gguf.*"))
    out.write_bytes(b"keep")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["gguf", "--model", str(model_dir), "--out", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep"


def test_q4_k_is_not_writable_by_gguf_py():
    """Why q4_k_m is refused: gguf-py dequantizes the K-quants but cannot quantize them."""
    with pytest.raises(NotImplementedError):
        gguf.quants.quantize(np.zeros((1, 256), np.float32), QT.Q4_K)
    with pytest.raises(InputError, match="Q4_K_M"):
        export_model("unused", [], "unused.gguf", "q4_k_m")
