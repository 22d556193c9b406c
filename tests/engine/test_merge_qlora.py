"""`python -m engine.merge` on a QLoRA adapter: ``--onto quantized`` (default) and ``original``,
``--requantize nf4``, and the drift from the model as trained, on a short real QLoRA run of the
tiny model (targets q, v, up, down: k, o and gate stay untargeted).

Oracles: the model as trained (`load_model(quantize="nf4")` + the adapter unmerged) for the logits,
W + s·B·A formed here from the adapter file's tensors, and `kernels.nf4` quantize -> dequantize for
the requantized folder.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.adapters import LoRAConfig, inject_lora, load_adapter, save_adapter
from engine.config import TrainConfig
from engine.errors import InputError, run_cli
from engine.merge import main
from engine.recipes import sft
from kernels.nf4 import dequantize_nf4, quantize_nf4
from models.bnb_writer import save_bnb_nf4_model
from models.loading import load_model
from models.quantized import NF4Linear, quantize_linears
from tests.tolerances import LOGITS_FP32_ATOL, assert_close

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
UNTARGETED = ("self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
# |KL| between two fp32 evaluations of one model over the 49152 classes (rounding of the merged
# vs unmerged products and of log_softmax): measured ~1e-8, never above this floor.
KL_FLOOR = 1e-7


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A 3-step QLoRA SFT run (lr 1e-2: B moves well away from 0) on 12 license Q&A records."""
    root = tmp_path_factory.mktemp("qlora")
    data = root / "train.jsonl"
    data.write_text("".join((ROOT / "examples" / "license_qa.jsonl").read_text().splitlines(True)[:12]))
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(data), output=str(root / "run"), quant="nf4", max_steps=3,
                      lr=1e-2, max_len=64, lora_r=4, lora_alpha=8, seed=1, batch_size=4,
                      target_modules=",".join(TARGETS))
    sft.train(cfg, progress=False)
    return root / "run"


def merge(model_dir, adapter, out, *extra):
    assert main(["--model", str(model_dir), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32",
                 "--drift-samples", "8", *extra]) == 0
    return json.loads((out / "merge.json").read_text())


def as_trained(model_dir, adapter):
    model = load_model(model_dir, quantize="nf4")
    load_adapter(model, adapter)
    return model


def ids():
    return torch.randint(0, 49152, (2, 13), generator=torch.Generator().manual_seed(3))


def names(prefixes):
    return [f"model.layers.{i}.{p}" for i in range(2) for p in prefixes]


def lora_delta(adapter, module):
    """s·B·A of one module, from the adapter file (scale alpha / r = 8 / 4)."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    a, b = (tensors[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
    return 2.0 * (b.float() @ a.float())


def test_default_is_quantized_and_matches_the_model_as_trained(run, tiny_model_dir, tmp_path, capsys):
    record = merge(tiny_model_dir, run / "adapter", tmp_path / "m")
    out = capsys.readouterr().out
    assert record["qlora"] and record["onto"] == "quantized" and record["requantize"] == "none"
    assert "config.json" in record["qlora_because"] and record["quant"] == "none"
    drift = record["drift"]
    assert drift["samples"] == 8 and drift["tokens"] > 100
    assert abs(drift["kl"]) <= KL_FLOOR and drift["top1"] == 1.0, drift
    assert record["drift_data"] == str(run.parent / "train.jsonl") and record["drift_unmeasured"] is None
    assert "changed" not in record["drift_on"]
    assert "top-1 agreement 100.00%" in out and "first 8 samples" in out
    readme = (tmp_path / "m" / "README.md").read_text()
    assert "--onto quantized" in readme and "mean KL" in readme
    with torch.no_grad():
        assert_close(load_model(tmp_path / "m")(ids()), as_trained(tiny_model_dir, run / "adapter")(ids()),
                     torch.float32, "merged --onto quantized vs as trained", atol=LOGITS_FP32_ATOL)


def test_a_changed_training_file_is_said(run, tiny_model_dir, tmp_path):
    data = run.parent / "train.jsonl"
    text = data.read_text()
    try:
        data.write_text(text + text.splitlines(True)[0])
        record = merge(tiny_model_dir, run / "adapter", tmp_path / "m", "--drift-samples", "2")
    finally:
        data.write_text(text)
    assert "the file changed since the run" in record["drift_on"] and record["drift"]["samples"] == 2


def test_default_with_requantize_is_original(run, tiny_model_dir, tmp_path):
    record = merge(tiny_model_dir, run / "adapter", tmp_path / "m", "--requantize", "nf4", "--drift-samples", "0")
    assert record["onto"] == "original" and record["requantize"] == "nf4" and record["drift"] is None
    assert record["drift_unmeasured"] == "unmeasured: --drift-samples 0"


def test_original_is_w_plus_sba_and_drifts_more(run, tiny_model_dir, tmp_path):
    quantized = merge(tiny_model_dir, run / "adapter", tmp_path / "q", "--onto", "quantized")
    original = merge(tiny_model_dir, run / "adapter", tmp_path / "o", "--onto", "original")
    assert original["onto"] == "original" and original["dequantized"] == []
    base, merged = load_model(tiny_model_dir), load_model(tmp_path / "o")
    for name in names(("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")):
        want = base.get_submodule(name).weight.float() + lora_delta(run / "adapter", name)
        assert_close(merged.get_submodule(name).weight, want, torch.float32, name)
    for name in names(UNTARGETED):  # the original weights, not NF4-rounded ones
        assert torch.equal(merged.get_submodule(name).weight, base.get_submodule(name).weight), name
    assert abs(quantized["drift"]["kl"]) <= KL_FLOOR < 10 * KL_FLOOR < original["drift"]["kl"]
    assert original["drift"]["top1"] <= quantized["drift"]["top1"]
    assert "--onto original" in (tmp_path / "o" / "README.md").read_text()


@pytest.mark.parametrize("onto", ["quantized", "original"])
def test_requantize_is_nf4_of_the_merged_weights(run, tiny_model_dir, tmp_path, onto):
    dense = tmp_path / "dense"
    main(["--model", str(tiny_model_dir), "--adapter", str(run / "adapter"), "--out", str(dense), "--onto", onto,
          "--drift-samples", "0"])  # bf16
    record = merge(tiny_model_dir, run / "adapter", tmp_path / "q4", "--onto", onto, "--requantize", "nf4",
                   "--dtype", "bf16")
    assert record["requantize"] == "nf4" and record["drift"]["tokens"] > 100 and record["drift"]["kl"] > 0
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    q4, merged, trained_nf4 = load_model(tmp_path / "q4"), load_model(dense), load_model(tiny_model_dir, quantize="nf4")
    for name in names(("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")):
        module = q4.get_submodule(name)
        assert isinstance(module, NF4Linear), name
        dense_weight = merged.get_submodule(name).weight.detach().to(torch.bfloat16)
        want = dequantize_nf4(quantize_nf4(dense_weight), torch.float32)
        assert torch.equal(dequantize_nf4(module.weight_nf4, torch.float32), want), name
    for name in names(UNTARGETED):  # NF4 of the original weight in both modes: what training used
        got, trained = q4.get_submodule(name).weight_nf4, trained_nf4.get_submodule(name).weight_nf4
        assert torch.equal(dequantize_nf4(got, torch.float32), dequantize_nf4(trained, torch.float32)), name


def test_bnb_base_merges_onto_quantized_only(run, tiny_model_dir, tmp_path):
    bnb = tmp_path / "bnb"
    model = load_model(tiny_model_dir)
    quantize_linears(model)
    save_bnb_nf4_model(model, bnb, torch.float32)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, bnb / name)
    args = ["--model", str(bnb), "--adapter", str(run / "adapter"), "--out", str(tmp_path / "m"), "--onto", "original"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    assert exit_info.value.code == 2 and not (tmp_path / "m").exists()
    record = merge(bnb, run / "adapter", tmp_path / "m")
    assert record["onto"] == "quantized" and "bitsandbytes 4-bit" in record["qlora_because"]
    merge(tiny_model_dir, run / "adapter", tmp_path / "dense", "--onto", "quantized")
    ours, dense = load_model(tmp_path / "m").state_dict(), load_model(tmp_path / "dense").state_dict()
    assert all(torch.equal(ours[k], dense[k]) for k in dense)
    assert record["drift"]["top1"] == 1.0
    requantized = merge(bnb, run / "adapter", tmp_path / "m4", "--requantize", "nf4", "--drift-samples", "0")
    assert requantized["onto"] == "quantized"  # the only one a 4-bit base allows


def test_unmeasured_without_data_and_plain_lora_refuses_onto(tiny_model_dir, tmp_path, capsys):
    model = load_model(tiny_model_dir)
    torch.manual_seed(0)
    inject_lora(model, cfg := LoRAConfig(r=4, alpha=8, target_modules=("q_proj",)))
    adapter = save_adapter(model, cfg, tmp_path / "adapter", str(tiny_model_dir))  # no run, no metadata
    record = merge(tiny_model_dir, adapter, tmp_path / "m", "--quant", "nf4")
    assert record["qlora_because"] == "--quant nf4" and record["drift"] is None
    assert "records no training data" in record["drift_unmeasured"] and "--drift-data" in record["drift_unmeasured"]
    assert "unmeasured" in capsys.readouterr().out
    for extra, match in ((["--onto", "original"], "only for a QLoRA adapter"),
                         (["--requantize", "nf4"], "only for a QLoRA adapter"),
                         (["--quant", "nf4", "--drift-data", str(tmp_path / "missing.jsonl")], "no such file")):
        with pytest.raises(InputError, match=match):
            main(["--model", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "bad"), *extra])
        assert not (tmp_path / "bad").exists()
    data = str(ROOT / "examples" / "license_qa.jsonl")
    plain = merge(tiny_model_dir, adapter, tmp_path / "plain", "--drift-data", data)
    assert not plain["qlora"] and plain["onto"] is None and plain["drift"]["top1"] == 1.0
    assert abs(plain["drift"]["kl"]) <= KL_FLOOR
