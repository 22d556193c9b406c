"""Training, merging and evaluating on an int8 or FP8 frozen base (``--quant int8|fp8``).

* int8 is a storage format: training on it equals, step for step, training a dense model whose
  weights are the dequantized int8 ones (the same products on the same rounded weights).
* FP8 computes its products in FP8 (activations rounded too): its losses differ from the dense
  run's, by the e4m3 rounding only.
* Either merges back like QLoRA: ``--onto quantized`` gives a dense folder whose logits are those
  of the model as trained (quantized base + the adapter unmerged).
"""

from __future__ import annotations

import pytest
import torch

from engine.adapters import lora_modules
from engine.adapters.methods import load_adapted_model
from engine.merge import merge_to_folder
from models import load_model
from models.loading import save_model
from models.quantized import FP8Linear, Int8Linear, dequantize_linears, quantize_linears
from tests.engine.recipes.test_sft import run_config, train, train_losses
from tests.tolerances import LOGITS_FP32_ATOL, assert_close

FORMATS = {"int8": Int8Linear, "fp8": FP8Linear}


@pytest.fixture(scope="module")
def int8_rounded_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with every block linear replaced by its dequantized int8 weight, dense fp32."""
    model = load_model(tiny_model_dir)
    quantize_linears(model, fmt="int8")
    dequantize_linears(model, torch.float32)
    out = tmp_path_factory.mktemp("int8-rounded")
    save_model(model, out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "generation")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_int8_training_equals_dense_training_on_the_rounded_weights(tiny_model_dir, int8_rounded_dir, qa_data,
                                                                    tmp_path):
    run = train(run_config(tiny_model_dir, qa_data, tmp_path / "int8", quant="int8", max_steps=3))
    modules = lora_modules(run.model)
    assert len(modules) == 2 * 7 and all(isinstance(m.base, Int8Linear) for m in modules.values())
    train(run_config(int8_rounded_dir, qa_data, tmp_path / "dense", max_steps=3))
    got, want = train_losses(tmp_path / "int8"), train_losses(tmp_path / "dense")
    assert len(got) == 3
    assert_close(torch.tensor(got), torch.tensor(want), torch.float32, "losses")


def test_fp8_training_runs_its_products_in_fp8(tiny_model_dir, qa_data, tmp_path):
    run = train(run_config(tiny_model_dir, qa_data, tmp_path / "fp8", quant="fp8", max_steps=3))
    assert all(isinstance(m.base, FP8Linear) for m in lora_modules(run.model).values())
    train(run_config(tiny_model_dir, qa_data, tmp_path / "dense", max_steps=3))
    got, dense = torch.tensor(train_losses(tmp_path / "fp8")), torch.tensor(train_losses(tmp_path / "dense"))
    assert bool(torch.isfinite(got).all()) and not torch.equal(got, dense)  # FP8 rounding is in the loss
    assert float((got - dense).abs().max()) < 0.05 * float(dense.abs().max())  # ... and only that


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_merge_onto_the_quantized_base_gives_the_trained_logits(fmt, tiny_model_dir, qa_data, tmp_path):
    # lr 1e-2 for 2 steps: B moves away from zero, so the merge carries a real update
    train(run_config(tiny_model_dir, qa_data, tmp_path / "run", quant=fmt, max_steps=2, lora_dropout=0.0))
    adapter = tmp_path / "run" / "adapter"
    result = merge_to_folder(str(tiny_model_dir), str(adapter), tmp_path / "merged", torch.float32)
    assert result.plan.qlora and result.plan.fmt == fmt and result.plan.onto == "quantized"
    ids = torch.tensor([[1, 400, 2031, 77, 9, 3000, 12]])
    merged = load_model(tmp_path / "merged")(ids)
    if fmt == "int8":
        trained = load_adapted_model(tiny_model_dir, adapter, quantize=fmt)(ids)
        assert_close(merged, trained, torch.float32, "logits", atol=LOGITS_FP32_ATOL)
    else:  # FP8 rounds activations in its products, which a dense model cannot: the merged weights match
        trained = load_adapted_model(tiny_model_dir, adapter, quantize=fmt)
        written = load_model(tmp_path / "merged")
        for name, module in lora_modules(trained).items():
            assert_close(written.get_submodule(name).weight, module.merged(torch.float32).weight, torch.float32, name)


def test_merge_onto_a_bitsandbytes_8bit_base(tmp_path):
    """A pre-quantized bitsandbytes 8-bit base (made by transformers + bitsandbytes on the CPU)
    decides the format: the adapter is merged onto its int8 weights, and the merged dense folder
    gives the logits of the 8-bit base with the adapter on top; --onto original is refused."""
    from engine.adapters import LoRAConfig, inject_lora, save_adapter
    from engine.errors import InputError
    from tests.models.test_bnb8_checkpoint import quantize_8bit_with_transformers
    from tests.models.test_bnb_checkpoint import ids_batch, save_random_llama

    bnb8 = quantize_8bit_with_transformers(save_random_llama(tmp_path / "dense"), tmp_path / "bnb8")
    model = load_model(bnb8)
    torch.manual_seed(0)
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    inject_lora(model, config)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.normal_(0, 0.05)
    adapter = save_adapter(model, config, tmp_path / "adapter", str(bnb8))
    result = merge_to_folder(str(bnb8), str(adapter), tmp_path / "merged", torch.float32)
    assert result.plan.fmt == "int8" and result.plan.onto == "quantized" and "8-bit" in result.plan.why_qlora
    ids = ids_batch()
    merged = load_model(tmp_path / "merged")
    assert not any(isinstance(m, Int8Linear) for m in merged.modules())
    assert_close(merged(ids), load_adapted_model(bnb8, adapter)(ids), torch.float32, "logits", atol=LOGITS_FP32_ATOL)
    with pytest.raises(InputError, match="8-bit checkpoint"):
        merge_to_folder(str(bnb8), str(adapter), tmp_path / "merged2", torch.float32, onto="original")
