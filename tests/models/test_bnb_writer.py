"""Writing a bitsandbytes 4-bit (NF4) folder: read back by our loader, by transformers + bitsandbytes
(CPU), and holding the very keys, dtypes, shapes and quant states transformers itself writes.

Oracles: `kernels.nf4` quantize -> dequantize of each dense weight (our reader must give those
values bit for bit), and transformers + bitsandbytes quantizing the same tiny random Llama and
saving it (our folder must hold the same tensors, byte for byte, since our quantizer is
bitsandbytes'; its 4-bit model must give our logits on our folder).
"""

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from kernels.nf4 import dequantize_nf4, quantize_nf4
from models import load_model
from models.bnb_writer import save_bnb_nf4_model
from models.loading import weight_files
from models.quantized import NF4Linear, quantize_linears
from tests.models.test_bnb_checkpoint import ids_batch, linear_names, quantize_with_transformers, save_random_llama
from tests.tolerances import LOGITS_FP32_ATOL, assert_close


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """The tiny random Llama of test_bnb_checkpoint (rows of 64 and 320: bnb's CPU path needs
    multiples of the blocksize), with non-zero attention biases."""
    return save_random_llama(tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def ours_dir(dense_dir, tmp_path_factory):
    """Our 4-bit folder of the dense model, fp32 non-quantized tensors and compute dtype."""
    return save_bnb_nf4_model(load_model(dense_dir), tmp_path_factory.mktemp("ours4") / "m", torch.float32)


def tensors_of(folder):
    out = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_our_reader_gives_nf4_roundtrip_of_each_weight(dense_dir, ours_dir):
    dense, back = load_model(dense_dir), load_model(ours_dir)
    for name in linear_names():
        module = back.get_submodule(name)
        assert isinstance(module, NF4Linear), name
        want = dequantize_nf4(quantize_nf4(dense.get_submodule(name).weight.detach()), torch.float32)
        assert torch.equal(dequantize_nf4(module.weight_nf4, torch.float32), want), name
        assert torch.equal(module.bias, dense.get_submodule(name).bias) if module.bias is not None else True
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(back.get_parameter(name), dense.get_parameter(name)), name


def test_keys_and_bytes_equal_what_transformers_writes(dense_dir, ours_dir, tmp_path):
    hf_dir = tmp_path / "hf4"
    quantize_with_transformers(dense_dir, double_quant=True).save_pretrained(hf_dir)
    ours, theirs = tensors_of(ours_dir), tensors_of(hf_dir)
    assert ours.keys() == theirs.keys()
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape, key
        if key.endswith("quant_state.bitsandbytes__nf4"):
            assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(t.tolist())), key
        else:
            assert torch.equal(ours[key], t), key
    ours_qc = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    theirs_qc = json.loads((hf_dir / "config.json").read_text())["quantization_config"]
    assert ours_qc == theirs_qc


def test_transformers_4bit_model_on_our_folder_gives_our_logits(ours_dir):
    # No quantization_config given: transformers takes ours from config.json (compute dtype fp32).
    hf4 = transformers.LlamaForCausalLM.from_pretrained(ours_dir, device_map="cpu", dtype=torch.float32).eval()
    assert type(hf4.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    for module in hf4.modules():  # compute in fp32 as the config says (see quantize_with_transformers)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        assert_close(hf4(ids_batch()).logits, load_model(ours_dir)(ids_batch()), name="logits",
                     atol=LOGITS_FP32_ATOL, rtol=0)


def test_nf4_linears_kept_as_they_are_and_shards_read_back(dense_dir, tmp_path):
    """An NF4Linear's tensor is written unchanged (no second rounding); 40 KB shards split the
    groups of keys over files and the loader gathers them."""
    model = load_model(dense_dir, dtype=torch.bfloat16)
    quantize_linears(model)
    out = save_bnb_nf4_model(model, tmp_path / "m", torch.bfloat16, max_shard_bytes=40_000)
    assert len(weight_files(out)) > 2
    back = load_model(out, dtype=torch.bfloat16)
    for name in linear_names():
        q, r = model.get_submodule(name).weight_nf4, back.get_submodule(name).weight_nf4
        assert torch.equal(q.packed, r.packed) and torch.equal(q.absmax, r.absmax), name
        assert r.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(back(ids_batch()), model(ids_batch()))
