"""Loading: round trips through sharded safetensors, dtypes, and one clear error per bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import InputError
from models import load_model, resolve_model_dir
from models.config import LlamaConfig
from models.loading import expected_tensors, save_model
from tools import random_checkpoint
from tools.random_checkpoint import random_model

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 2-layer random checkpoint written in several shards with an index."""
    model = random_model(CFG, seed=1)
    folder = save_model(model, tmp_path_factory.mktemp("sharded"), max_shard_bytes=20_000)
    return model, folder


def copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_exact(tmp_path, tied):
    model = random_model(CFG.replace(tie_word_embeddings=tied), seed=2)
    folder = save_model(model, tmp_path, max_shard_bytes=20_000)
    assert (folder / "model.safetensors.index.json").is_file()
    loaded = load_model(folder)
    assert not loaded.training and loaded.model.inv_freq.device.type == "cpu"
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    ids = torch.randint(0, 64, (2, 7))
    assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtypes(sharded, dtype):
    model, folder = sharded
    loaded = load_model(folder, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert loaded.model.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight.to(dtype))


def test_random_checkpoint_cli_preset_shapes(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        random_checkpoint.run_cli(random_checkpoint.main, ["--preset", "smollm2-135m", "--out", str(tmp_path),
                                                           "--layers", "1", "--dtype", "bf16", "--shard-gb", "0.03"])
    assert exit_info.value.code == 0
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    cfg = LlamaConfig.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    assert set(index["weight_map"]) == set(expected_tensors(cfg)) and cfg.num_hidden_layers == 1
    model = load_model(tmp_path, dtype=torch.bfloat16)
    std = model.model.layers[0].self_attn.q_proj.weight.float().std()
    assert abs(std - 0.02) < 1e-3


def test_no_config_json(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        load_model(tmp_path)


def test_truncated_safetensors(sharded, tmp_path):
    folder = copy_folder(sharded[1], tmp_path / "m")
    shard = folder / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InputError, match="model-00002-of-00004.safetensors: unreadable safetensors"):
        load_model(folder)


def test_missing_shard(sharded, tmp_path):
    folder = copy_folder(sharded[1], tmp_path / "m")
    (folder / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(InputError, match="shard.*missing.*model-00003-of-00004.safetensors"):
        load_model(folder)


def rewrite_tensor(folder, name, value):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value(tensors[name])
    save_file(tensors, shard)
    return shard.name


@pytest.mark.parametrize("case, value, message", [
    ("mis-shaped", lambda t: t[:, :-1].contiguous(), r"has shape \(16, 31\), expected \(16, 32\)"),
    ("nan", lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "non-finite"),
    ("inf", lambda t: t.index_fill(1, torch.tensor([31]), float("inf")), "non-finite"),
    ("-inf", lambda t: t.index_fill(0, torch.tensor([15]), -float("inf")), "non-finite"),
    ("missing", None, "missing from the checkpoint: model.layers.1.self_attn.k_proj.weight"),
])
def test_bad_tensor_is_named(sharded, tmp_path, case, value, message):
    folder = copy_folder(sharded[1], tmp_path / "m")
    name = "model.layers.1.self_attn.k_proj.weight"
    shard = rewrite_tensor(folder, name, value)
    with pytest.raises(InputError, match=message) as err:
        load_model(folder)
    if case != "missing":
        assert shard in str(err.value) and name in str(err.value)


@pytest.mark.parametrize("workers", [1, 3])
def test_several_workers_load_exactly_and_name_the_first_bad_tensor(sharded, tmp_path, monkeypatch, workers):
    """The per-tensor steps on 1 or 3 threads: the same tensors, and of two bad ones in a shard the
    error names the first in the file's order, whichever thread fails first."""
    import models.loading

    monkeypatch.setattr(models.loading, "load_workers", lambda device: workers)
    model, folder = sharded
    loaded = load_model(folder, dtype=torch.bfloat16)
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p.to(torch.bfloat16)), name
    bad = copy_folder(folder, tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    shard = max(set(index.values()), key=lambda f: sum(v == f for v in index.values()))  # the fullest shard
    tensors = load_file(bad / shard)
    first, second = sorted(tensors)[1], sorted(tensors)[-1]  # safetensors stores names sorted
    tensors[first] = tensors[first].clone().fill_(float("nan"))
    tensors[second] = tensors[second].clone().fill_(float("inf"))
    save_file(tensors, bad / shard)
    with pytest.raises(InputError, match=rf"{shard}: tensor '{first}' has non-finite values"):
        load_model(bad, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight"])
def test_nf4_load_checks_finiteness_before_quantizing(sharded, tmp_path, name):
    """A NaN in a linear that QLoRA quantizes is refused like one in a dense tensor."""
    folder = copy_folder(sharded[1], tmp_path / "m")
    shard = rewrite_tensor(folder, name, lambda t: t.index_fill(0, torch.tensor([1]), float("nan")))
    with pytest.raises(InputError, match=rf"{shard}: tensor '{name}' has non-finite values"):
        load_model(folder, dtype=torch.bfloat16, quantize="nf4")


def test_unexpected_tensor(tmp_path):
    model = random_model(CFG)
    save_model(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(40, 32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="model.safetensors: unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        load_model(tmp_path)


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(InputError, match="pickled weights are never loaded"):
        load_model(tmp_path)


def test_resolve_names(tmp_path, monkeypatch):
    assert resolve_model_dir(tmp_path) == tmp_path
    with pytest.raises(InputError, match="not a folder, a preset"):
        resolve_model_dir(tmp_path / "does" / "not" / "exist")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="HF_HUB_OFFLINE is set"):
        resolve_model_dir("no-such-org-xyz/no-such-model-xyz")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_is_one_exact_reduction(dtype):
    from models.loading import all_finite

    for n in (1, 7, 1000, 4099):
        assert all_finite(torch.randn(n).to(dtype))
        for pos in (0, n // 2, n - 1):
            for bad in (float("nan"), float("inf"), -float("inf")):
                t = torch.randn(n).to(dtype)
                t[pos] = bad
                assert not all_finite(t), (n, pos, bad)
    assert all_finite(torch.full((4096,), torch.finfo(dtype).max, dtype=dtype))  # a sum would overflow
    assert all_finite(torch.empty(0, dtype=dtype))


def test_finite_after_the_cast(tmp_path):
    """A finite fp32 value beyond fp16's range is inf once loaded in fp16: refused, named."""
    model = random_model(CFG)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[2, 3] = 1e6
    save_model(model, tmp_path)
    assert load_model(tmp_path).model.layers[0].mlp.up_proj.weight[2, 3] == 1e6
    with pytest.raises(InputError, match=r"'model.layers.0.mlp.up_proj.weight' has non-finite values .*float16"):
        load_model(tmp_path, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_on_the_device_equals_quantizing_the_dense_load_on_cpu(sharded, device, dtype):
    """Quantized tensor by tensor on the target device = the dense model loaded on the CPU, then
    quantized there (quantize_linears): the same NF4 bytes, statistics and dense remainder."""
    from models.quantized import NF4Linear, quantize_linears

    _, folder = sharded
    on_device = load_model(folder, dtype=dtype, device=device, quantize="nf4")
    on_cpu = load_model(folder, dtype=dtype)
    assert len(quantize_linears(on_cpu)) == 7 * CFG.num_hidden_layers
    ours, theirs = on_device.state_dict(), on_cpu.state_dict()
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].device.type == device and ours[name].dtype == t.dtype, name
        assert torch.equal(ours[name].cpu(), t), name
    assert sum(isinstance(m, NF4Linear) for m in on_device.modules()) == 7 * CFG.num_hidden_layers
