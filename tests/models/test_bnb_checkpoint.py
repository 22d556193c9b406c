"""Pre-quantized bitsandbytes NF4 checkpoints: loaded without bitsandbytes, equal to bitsandbytes.

Oracles: transformers + bitsandbytes (CPU) quantize a tiny random Llama and save it the way every
bnb-4bit folder on the Hub is saved. Our `load_model` on that folder must give NF4Linear block
linears whose dequantized weights equal bitsandbytes' ``dequantize_4bit`` bit for bit, logits equal
to transformers' 4-bit model, and, since our quantizer is byte-identical to bitsandbytes', exactly
the model that ``quantize="nf4"`` builds from the dense folder. Then: sharded folders with a
linear's keys spread over shards, QLoRA on top, and one clear error per bad folder.
"""

import json
import shutil

import bitsandbytes
import bitsandbytes.functional as bnb_functional
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine.adapters import LoRAConfig, adapter_params, inject_lora
from engine.errors import InputError
from kernels.nf4 import dequantize_nf4, nf4_dequant_ref, quantize_nf4
from models import load_model
from models.bnb_checkpoint import from_bnb_state_dict, to_bnb_state_dict
from models.llama import LlamaForCausalLM
from models.loading import load_weights, read_config
from models.quantized import NF4Linear
from tests.tolerances import LOGITS_FP32_ATOL, assert_close

# Row widths (64, 320) are multiples of the blocksize, as bitsandbytes' CPU dequantizer needs;
# 320 x 64 weights have 320 blocks, so double quantization spans two nested blocks of 256.
HF_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=320, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False)
PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linear_names(n_layers=HF_CONFIG["num_hidden_layers"]):
    return [f"model.layers.{i}.{p}" for i in range(n_layers) for p in PROJS]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return save_random_llama(tmp_path_factory.mktemp("dense"))


def save_random_llama(folder):
    """The tiny random transformers Llama of HF_CONFIG (seed 0), with non-zero attention biases,
    saved as safetensors into folder; returns folder."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
    with torch.no_grad():  # HF initialises biases to zero: make them count
        for name in linear_names():
            bias = model.get_submodule(name).bias
            if bias is not None:
                bias.normal_(0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def quantize_with_transformers(dense_dir, double_quant, **extra):
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=double_quant,
                                            bnb_4bit_compute_dtype=torch.float32, **extra)
    hf4 = transformers.LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=quant, device_map="cpu",
                                                        dtype=torch.float32)
    # On CPUs with AVX512-BF16, bitsandbytes' inference forward repacks the weight and computes in
    # bf16; the oracle must compute in fp32 like bnb_4bit_compute_dtype says, so keep that path off.
    for module in hf4.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return hf4.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["double_quant", "single_quant"])
def bnb(request, dense_dir, tmp_path_factory):
    """(folder, transformers' 4-bit model, double_quant) quantized by transformers + bitsandbytes."""
    hf4 = quantize_with_transformers(dense_dir, request.param)
    folder = tmp_path_factory.mktemp("bnb4")
    hf4.save_pretrained(folder)
    return folder, hf4, request.param


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"].update(changes)
    path.write_text(json.dumps(cfg))


def quantized_on_load(dense_dir, double_quant):
    """The dense folder with its block linears quantized by us while loading (as quantize="nf4"
    does, with the double quantization chosen here)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(read_config(dense_dir))

    def quantize(name, tensor):
        is_block_linear = name.startswith("model.layers.") and name.endswith("_proj.weight")
        return quantize_nf4(tensor, double_quant=double_quant) if is_block_linear else tensor
    load_weights(model, dense_dir, torch.float32, "cpu", transform=quantize)
    return model.eval()


def ids_batch():
    return torch.randint(0, HF_CONFIG["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))


def test_linears_are_nf4_and_dequantize_like_bitsandbytes(bnb, dense_dir):
    folder, hf4, double_quant = bnb
    ours = load_model(folder)  # quantize=None: the checkpoint decides
    dense = load_model(dense_dir)
    for name in linear_names():
        module, hf_module = ours.get_submodule(name), hf4.get_submodule(name)
        assert isinstance(module, NF4Linear) and module.weight_nf4.double_quant == double_quant, name
        want = bnb_functional.dequantize_4bit(hf_module.weight.data, hf_module.weight.quant_state, quant_type="nf4")
        assert torch.equal(dequantize_nf4(module.weight_nf4, torch.float32), want), name
        dense_bias = dense.get_submodule(name).bias  # attention_bias: only q, k, v, o have one
        assert (module.bias is None) == (dense_bias is None) == ("self_attn" not in name), name
        assert dense_bias is None or torch.equal(module.bias, dense_bias), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"):
        assert torch.equal(ours.get_parameter(name), dense.get_parameter(name)), name


def test_logits_equal_transformers_4bit_model(bnb):
    folder, hf4, _ = bnb
    ids = ids_batch()
    with torch.no_grad():
        assert_close(load_model(folder)(ids), hf4(ids).logits, name="logits", atol=LOGITS_FP32_ATOL, rtol=0)


def test_logits_equal_quantize_on_load(bnb, dense_dir):
    """Our quantizer is byte-identical to bitsandbytes': loading the bnb folder and quantizing the
    dense folder while loading build the same model (quantize= changes nothing on a bnb folder)."""
    folder, _, double_quant = bnb
    ids = ids_batch()
    pre = load_model(folder)
    assert torch.equal(load_model(folder, quantize="nf4")(ids), pre(ids))
    assert torch.equal(pre(ids), quantized_on_load(dense_dir, double_quant)(ids))
    if double_quant:  # quantize="nf4" double-quantizes
        assert torch.equal(pre(ids), load_model(dense_dir, quantize="nf4")(ids))


def test_quant_storage_bf16(dense_dir, tmp_path):
    """bnb_4bit_quant_storage=bfloat16 stores the packed bytes as a (n/4, 1) bf16 tensor."""
    hf4 = quantize_with_transformers(dense_dir, True, bnb_4bit_quant_storage=torch.bfloat16)
    hf4.save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    ids = ids_batch()
    assert torch.equal(load_model(tmp_path)(ids), quantized_on_load(dense_dir, True)(ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compute_dtype(bnb, dtype):
    folder, _, _ = bnb
    ours = load_model(folder, dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    assert isinstance(ours.model.layers[0].mlp.down_proj, NF4Linear)
    ids = ids_batch()
    with torch.no_grad():
        got, want = ours(ids), load_model(folder)(ids)
    assert got.dtype == dtype
    assert_close(got, want, dtype, name=f"{dtype} logits vs fp32")


def test_sharded_with_split_linears(bnb, tmp_path):
    """Keys dealt round-robin over three shards, so every linear's group spans files."""
    folder, _, _ = bnb
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = [names[i::3] for i in range(3)]
    out = tmp_path / "sharded"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in shard}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    single, sharded = load_model(folder), load_model(out)
    assert single.state_dict().keys() == sharded.state_dict().keys()
    for key, value in single.state_dict().items():
        assert torch.equal(sharded.state_dict()[key], value), key


def test_qlora_on_prequantized_equals_qlora_on_quantize_on_load(bnb, dense_dir):
    """inject_lora wraps the loaded NF4Linear bases; with the same base bytes and the same seed,
    the loss and every LoRA gradient equal those of QLoRA on the dense folder quantized on load."""
    folder, _, double_quant = bnb
    ids = ids_batch()
    grads = []
    for model in (load_model(folder), quantized_on_load(dense_dir, double_quant)):
        torch.manual_seed(7)
        inject_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        assert isinstance(model.model.layers[1].mlp.up_proj.base, NF4Linear)
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in adapter_params(model).items()})
        grads[-1]["loss"] = loss.detach()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 14 + 1
    for name, g in grads[0].items():
        assert g is not None and bool(torch.isfinite(g).all()) and torch.equal(g, grads[1][name]), name


@pytest.mark.parametrize("changes,match", [
    ({"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type='fp4'"),
    ({"load_in_4bit": False, "_load_in_4bit": False, "load_in_8bit": True, "_load_in_8bit": True}, "8-bit"),
    ({"quant_method": "gptq"}, "quant_method='gptq'"),
])
def test_unsupported_quantization_configs_refused(bnb, tmp_path, changes, match):
    folder = copy_folder(bnb[0], tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(InputError, match=match) as err:
        load_model(folder)
    assert "config.json" in str(err.value)


def rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_absmax_named_with_its_file(bnb, tmp_path):
    folder = copy_folder(bnb[0], tmp_path / "m")
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight.absmax"))
    with pytest.raises(InputError, match=r"model\.safetensors: quantized linear model\.layers\.1\.mlp\.down_proj "
                                         r"lacks tensor\(s\) model\.layers\.1\.mlp\.down_proj\.weight\.absmax"):
        load_model(folder)


def test_missing_statistics_named(bnb, tmp_path):
    """The nested absmax with double quantization (needed because the quant state says so), else the quant map."""
    folder, _, double_quant = bnb
    folder = copy_folder(folder, tmp_path / "m")
    key = "model.layers.0.self_attn.k_proj.weight." + ("nested_absmax" if double_quant else "quant_map")
    rewrite_weights(folder, lambda t: t.pop(key))
    with pytest.raises(InputError, match=r"lacks tensor\(s\) " + key.replace(".", r"\.")):
        load_model(folder)


def test_fp4_quant_state_refused(bnb, tmp_path):
    folder = copy_folder(bnb[0], tmp_path / "m")
    key = "model.layers.0.mlp.gate_proj.weight.quant_state.bitsandbytes__"

    def to_fp4(t):
        t[key + "fp4"] = t.pop(key + "nf4")
    rewrite_weights(folder, to_fp4)
    with pytest.raises(InputError, match=r"model\.safetensors: tensor '.*gate_proj.*__fp4': quant type 'fp4'"):
        load_model(folder)


def test_quantized_lm_head_refused(bnb, tmp_path):
    folder = copy_folder(bnb[0], tmp_path / "m")

    def quantize_head(t):
        t["lm_head.weight.absmax"] = t["model.layers.0.mlp.up_proj.weight.absmax"].clone()
    rewrite_weights(folder, quantize_head)
    with pytest.raises(InputError, match=r"'lm_head\.weight\.absmax': only decoder-block linears"):
        load_model(folder)


def test_wrong_shape_in_quant_state_named(bnb, tmp_path):
    """A quant state whose shape disagrees with config.json (here: the up and gate states swapped
    with down's, which is (64, 320) instead of (320, 64))."""
    folder = copy_folder(bnb[0], tmp_path / "m")
    state = "weight.quant_state.bitsandbytes__nf4"

    def swap(t):
        up, down = f"model.layers.0.mlp.up_proj.{state}", f"model.layers.0.mlp.down_proj.{state}"
        t[up], t[down] = t[down], t[up]
    rewrite_weights(folder, swap)
    with pytest.raises(InputError, match=r"quantized tensor 'model\.layers\.0\.mlp\.(up|down)_proj\.weight' "
                                         r"has shape \((64, 320|320, 64)\), expected"):
        load_model(folder)


def test_skipped_modules_stay_dense(dense_dir, tmp_path):
    """Linears in llm_int8_skip_modules are saved dense and load as nn.Linear; the rest as NF4."""
    hf4 = quantize_with_transformers(dense_dir, True, llm_int8_skip_modules=["down_proj", "lm_head"])
    hf4.save_pretrained(tmp_path)
    ours, dense = load_model(tmp_path), load_model(dense_dir)
    for name in linear_names():
        module = ours.get_submodule(name)
        if name.endswith("down_proj"):
            assert type(module) is torch.nn.Linear and torch.equal(module.weight, dense.get_submodule(name).weight)
        else:
            assert isinstance(module, NF4Linear), name
    ids = ids_batch()
    with torch.no_grad():
        assert_close(ours(ids), hf4(ids).logits, name="logits", atol=LOGITS_FP32_ATOL, rtol=0)


# ---------------------------------------------------------------------------- one linear's keys, both ways

@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_equals_bnb_linear4bit(double_quant):
    w = _bnb_weight((64, 128), torch.bfloat16, seed=7)
    lin = bitsandbytes.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compress_statistics=double_quant)
    lin.weight = bitsandbytes.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant)
    expected = {"layer." + k: v for k, v in lin.to("cpu").state_dict().items()}
    ours = to_bnb_state_dict(quantize_nf4(w, 64, double_quant), "layer.")
    assert ours.keys() == expected.keys()
    for key in ours:
        assert ours[key].dtype == expected[key].dtype and torch.equal(ours[key], expected[key]), key
    meta = json.loads(bytes(ours["layer.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [64, 128] and meta["dtype"] == "bfloat16"


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_roundtrip_both_ways(double_quant):
    w = _bnb_weight((32, 192), torch.float16, seed=8)
    q = quantize_nf4(w, 64, double_quant)
    sd = to_bnb_state_dict(q, "m.up_proj")  # trailing dot added
    # ours -> bitsandbytes
    state = bnb_functional.QuantState.from_dict({k.removeprefix("m.up_proj.weight."): v for k, v in sd.items()
                                    if k != "m.up_proj.weight"}, device="cpu")
    assert torch.equal(bnb_functional.dequantize_4bit(sd["m.up_proj.weight"], state, quant_type="nf4"), nf4_dequant_ref(q, w.dtype))
    # bitsandbytes' keys -> ours
    back = from_bnb_state_dict(sd, "m.up_proj.")
    assert back.shape == w.shape and back.dtype == w.dtype and back.blocksize == 64
    assert torch.equal(dequantize_nf4(back, torch.float32), dequantize_nf4(q, torch.float32))


def test_from_bnb_state_dict_rejects_bad_keys():
    q = quantize_nf4(torch.randn(4, 64), 64)
    sd = to_bnb_state_dict(q, "x.")
    with pytest.raises(ValueError, match="missing key 'x.weight.absmax'"):
        from_bnb_state_dict({k: v for k, v in sd.items() if not k.endswith("absmax")}, "x.")
    meta = json.dumps({"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [4, 64]})
    sd["x.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(meta.encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="quant_type 'fp4' not supported"):
        from_bnb_state_dict(sd, "x.")


def _bnb_weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)
