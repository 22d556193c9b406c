"""Pre-quantized bitsandbytes 8-bit (LLM.int8) checkpoints: loaded without bitsandbytes, as bitsandbytes stores them.

Oracles: transformers + bitsandbytes (CPU) quantize a tiny random Llama with
``BitsAndBytesConfig(load_in_8bit=True)`` and save it as every bnb-8bit folder on the Hub is saved.
Our `load_model` on that folder must give Int8Linear block linears holding the file's codes and
SCB as they are, and logits equal to transformers' dense model whose block weights are replaced by
bitsandbytes' ``int8_vectorwise_dequant(CB, SCB)`` (transformers' own 8-bit forward quantizes the
activations too, which our storage-only int8 does not, so it is no oracle). Then: older files
without weight_format, sharded folders, skipped modules, and one clear error per bad folder.
"""

import json

import bitsandbytes
import bitsandbytes.functional as bnb_functional
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine.errors import InputError
from kernels.int8 import int8_dequant_ref, quantize_int8
from models import load_model
from models.bnb8_checkpoint import from_bnb8_state_dict, to_bnb8_state_dict
from models.bnb_checkpoint import bnb_checkpoint_format, is_bnb_nf4_checkpoint
from models.quantized import Int8Linear
from tests.models.test_bnb_checkpoint import copy_folder, ids_batch, linear_names, save_random_llama
from tests.tolerances import LOGITS_FP32_ATOL, assert_close


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return save_random_llama(tmp_path_factory.mktemp("dense"))


def quantize_8bit_with_transformers(dense_dir, folder, **extra):
    """transformers + bitsandbytes load the dense folder in 8-bit on the CPU and save it to folder."""
    quant = transformers.BitsAndBytesConfig(load_in_8bit=True, **extra)
    hf8 = transformers.LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=quant, device_map="cpu",
                                                        dtype=torch.float32)
    assert isinstance(hf8.model.layers[0].mlp.up_proj, bitsandbytes.nn.Linear8bitLt)
    hf8.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bnb8_dir(dense_dir, tmp_path_factory):
    return quantize_8bit_with_transformers(dense_dir, tmp_path_factory.mktemp("bnb8"))


def file_tensors(folder):
    return load_file(folder / "model.safetensors")


def dequantized_oracle(dense_dir, tensors):
    """transformers' dense Llama with every 8-bit block linear's weight replaced by bitsandbytes'
    dequantization of the file's codes: W = int8_vectorwise_dequant(CB, SCB) (fp32)."""
    model = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name in linear_names():
            if name + ".SCB" in tensors:
                w = bnb_functional.int8_vectorwise_dequant(tensors[name + ".weight"], tensors[name + ".SCB"])
                model.get_submodule(name).weight.copy_(w)
    return model


def test_folder_declares_int8(bnb8_dir, dense_dir):
    assert bnb_checkpoint_format(bnb8_dir) == "int8" and bnb_checkpoint_format(dense_dir) is None
    with pytest.raises(InputError, match=r"config\.json: bitsandbytes 8-bit .* not supported here"):
        is_bnb_nf4_checkpoint(bnb8_dir)  # it keeps its meaning: NF4 folders only


def test_linears_are_int8_with_the_files_codes(bnb8_dir, dense_dir):
    tensors = file_tensors(bnb8_dir)
    ours, dense = load_model(bnb8_dir), load_model(dense_dir)  # quantize=None: the checkpoint decides
    for name in linear_names():
        module = ours.get_submodule(name)
        assert isinstance(module, Int8Linear) and module.weight_dtype == torch.float32, name
        assert tensors[name + ".weight_format"].item() == 0, name
        assert torch.equal(module.weight_codes, tensors[name + ".weight"]), name
        assert torch.equal(module.weight_absmax, tensors[name + ".SCB"]), name
        # bitsandbytes quantizes the fp16 weight; our quantizer rounds the same way, byte for byte
        ref = quantize_int8(dense.get_submodule(name).weight.detach().half())
        assert torch.equal(ref.codes, module.weight_codes) and torch.equal(ref.absmax, module.weight_absmax), name
        dense_bias = dense.get_submodule(name).bias  # attention_bias: only q, k, v, o have one
        assert (module.bias is None) == (dense_bias is None) == ("self_attn" not in name), name
        assert dense_bias is None or torch.equal(module.bias, dense_bias), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"):
        assert torch.equal(ours.get_parameter(name), dense.get_parameter(name)), name


def test_logits_equal_dequantized_oracle(bnb8_dir, dense_dir):
    ids = ids_batch()
    ours = load_model(bnb8_dir)
    with torch.no_grad():
        want = dequantized_oracle(dense_dir, file_tensors(bnb8_dir))(ids).logits
        assert_close(ours(ids), want, name="logits", atol=LOGITS_FP32_ATOL, rtol=0)
        # quantize= changes nothing on a pre-quantized folder
        assert torch.equal(load_model(bnb8_dir, quantize="nf4")(ids), ours(ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compute_dtype(bnb8_dir, dtype):
    ours = load_model(bnb8_dir, dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    module = ours.model.layers[0].mlp.down_proj
    assert isinstance(module, Int8Linear) and module.weight_dtype == dtype
    assert torch.equal(module.weight_codes, file_tensors(bnb8_dir)["model.layers.0.mlp.down_proj.weight"])
    ids = ids_batch()
    with torch.no_grad():
        got, want = ours(ids), load_model(bnb8_dir)(ids)
    assert got.dtype == dtype
    assert_close(got, want, dtype, name=f"{dtype} logits vs fp32")


def rewritten(src, dst, edit):
    """A copy of the folder src at dst whose model.safetensors is passed through edit(tensors)."""
    folder = copy_folder(src, dst)
    tensors = file_tensors(folder)
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_files_without_weight_format_load_as_row(bnb8_dir, tmp_path):
    def drop_formats(t):
        for key in [k for k in t if k.endswith(".weight_format")]:
            del t[key]
    old = rewritten(bnb8_dir, tmp_path / "m", drop_formats)
    ids = ids_batch()
    assert torch.equal(load_model(old)(ids), load_model(bnb8_dir)(ids))


def test_sharded_with_split_linears(bnb8_dir, tmp_path):
    """Keys dealt round-robin over three shards, so every linear's group spans files."""
    tensors = file_tensors(bnb8_dir)
    names = sorted(tensors)
    out = copy_folder(bnb8_dir, tmp_path / "sharded")
    (out / "model.safetensors").unlink()
    weight_map = {}
    for i in range(3):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in names[i::3]}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in names[i::3]})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    single, sharded = load_model(bnb8_dir).state_dict(), load_model(out).state_dict()
    assert single.keys() == sharded.keys()
    for key, value in single.items():
        assert torch.equal(sharded[key], value), key


def test_skipped_modules_stay_dense(dense_dir, tmp_path):
    """Linears in llm_int8_skip_modules are saved dense and load as nn.Linear; the rest as int8."""
    folder = quantize_8bit_with_transformers(dense_dir, tmp_path, llm_int8_skip_modules=["down_proj", "lm_head"])
    ours, dense = load_model(folder), load_model(dense_dir)
    for name in linear_names():
        module = ours.get_submodule(name)
        if name.endswith("down_proj"):
            assert type(module) is torch.nn.Linear and torch.equal(module.weight, dense.get_submodule(name).weight)
        else:
            assert isinstance(module, Int8Linear), name
    ids = ids_batch()
    with torch.no_grad():
        want = dequantized_oracle(dense_dir, file_tensors(folder))(ids).logits
        assert_close(ours(ids), want, name="logits", atol=LOGITS_FP32_ATOL, rtol=0)


# ---------------------------------------------------------------------------- bad folders, one error each

def _set(key, value):
    def edit(t):
        t[key] = value
    return edit


def _pop(key):
    return lambda t: t.pop(key)


def _swap(a, b):
    def edit(t):
        t[a], t[b] = t[b], t[a]
    return edit


UP, DOWN = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("edit,match", [
    (_set(UP + ".weight_format", torch.tensor(1, dtype=torch.uint8)),
     r"model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight_format: weight_format 1 \('col32'\) "
     r"is not supported; expected 0"),
    (_pop(DOWN + ".SCB"),
     r"model\.safetensors: 8-bit quantized linear model\.layers\.1\.mlp\.down_proj lacks tensor\(s\) "
     r"model\.layers\.1\.mlp\.down_proj\.SCB"),
    (_set("model.embed_tokens.SCB", torch.ones(128)),
     r"model\.safetensors: tensor 'model\.embed_tokens\.SCB': only decoder-block linears"),
    (_set("model.embed_tokens.weight", torch.ones(128, 64, dtype=torch.int8)),
     r"model\.safetensors: tensor 'model\.embed_tokens\.weight': only decoder-block linears"),
    (_set(UP + ".weight.absmax", torch.ones(320)),
     r"model\.safetensors: tensor '.*up_proj\.weight\.absmax' is a bitsandbytes 4-bit key, but config\.json "
     r"declares an 8-bit"),
    (_swap(UP + ".SCB", "model.layers.0.mlp.down_proj.SCB"),
     r"model\.safetensors: tensor model\.layers\.0\.mlp\.(up|down)_proj\.SCB: expected \((320|64),\) fp32 row absmax"),
    (_set(UP + ".weight", torch.ones(320, 64, dtype=torch.float16)),
     r"tensor model\.layers\.0\.mlp\.up_proj\.weight: expected \(out, in\) int8 codes, got torch\.float16"),
])
def test_bad_folder_refused_naming_file_and_key(bnb8_dir, tmp_path, edit, match):
    folder = rewritten(bnb8_dir, tmp_path / "m", edit)
    with pytest.raises(InputError, match=match) as err:
        load_model(folder)
    assert str(folder) in str(err.value)


def test_both_bit_widths_declared_refused(bnb8_dir, tmp_path):
    folder = copy_folder(bnb8_dir, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(load_in_4bit=True, _load_in_4bit=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"config\.json: quantization_config sets both load_in_4bit and load_in_8bit"):
        load_model(folder)


# ---------------------------------------------------------------------------- one linear's keys, both ways

def _weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).half()


def _bnb_linear8bit(w):
    """bitsandbytes' Linear8bitLt holding w, quantized by bitsandbytes on the CPU."""
    out_f, in_f = w.shape
    lin = bitsandbytes.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
    lin.weight = bitsandbytes.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    return lin.to("cpu")


def test_state_dict_equals_bnb_linear8bitlt():
    w = _weight((37, 123), seed=7)
    expected = {"layer." + k: v for k, v in _bnb_linear8bit(w).state_dict().items()}
    ours = to_bnb8_state_dict(quantize_int8(w), "layer")  # trailing dot added
    assert list(ours) == list(expected) == ["layer.weight", "layer.SCB", "layer.weight_format"]
    for key in ours:
        assert ours[key].dtype == expected[key].dtype and torch.equal(ours[key], expected[key]), key


def test_state_dict_roundtrip_both_ways():
    w = _weight((48, 77), seed=8)
    q = quantize_int8(w)
    sd = to_bnb8_state_dict(q, "m.up_proj.")
    # ours -> bitsandbytes: a Linear8bitLt loads our keys and dequantizes them to our weights
    lin = _bnb_linear8bit(_weight((48, 77), seed=9))
    lin.load_state_dict({k.removeprefix("m.up_proj."): v for k, v in sd.items()})
    assert torch.equal(lin.weight.data, q.codes) and torch.equal(lin.weight.SCB, q.absmax)
    assert torch.equal(bnb_functional.int8_vectorwise_dequant(lin.weight.data, lin.weight.SCB),
                       int8_dequant_ref(q, torch.float32))
    # bitsandbytes' keys -> ours
    back = from_bnb8_state_dict(sd, "m.up_proj", dtype=torch.bfloat16)
    assert back.dtype == torch.bfloat16 and torch.equal(back.codes, q.codes) and torch.equal(back.absmax, q.absmax)
    del sd["m.up_proj.weight_format"]  # files written before bitsandbytes stored a format: row-major
    assert torch.equal(from_bnb8_state_dict(sd, "m.up_proj").codes, q.codes)


@pytest.mark.parametrize("key,value,match", [
    ("x.SCB", None, r"missing key 'x\.SCB'"),
    ("x.weight_format", torch.tensor(3, dtype=torch.uint8), r"x\.weight_format: weight_format 3 \('col_ampere'\)"),
    ("x.weight_format", torch.tensor(0.0), r"x\.weight_format: expected a one-element integer tensor"),
    ("x.weight", torch.zeros(4, 64, dtype=torch.uint8), r"x\.weight: expected \(out, in\) int8 codes"),
    ("x.SCB", torch.ones(5), r"x\.SCB: expected \(4,\) fp32 row absmax"),
    ("x.SCB", torch.tensor([1.0, -1.0, 1.0, 1.0]), r"x\.SCB: row absmax values must be finite and >= 0"),
    ("x.SCB", torch.tensor([1.0, float("nan"), 1.0, 1.0]), r"x\.SCB: row absmax values must be finite"),
])
def test_from_bnb8_state_dict_rejects_bad_keys(key, value, match):
    sd = to_bnb8_state_dict(quantize_int8(torch.randn(4, 64)), "x.")
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    with pytest.raises(ValueError, match=match):
        from_bnb8_state_dict(sd, "x.")
