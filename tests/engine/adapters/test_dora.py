"""DoRA (`engine.adapters.dora`, ``--peft dora``): the layer against the plain fp64 formula (output
and every gradient), the norm cache, PEFT 0.21 as the oracle both ways, merging, QDoRA on NF4
bases, and training runs that go through the method dispatch."""

import json
import math

import peft
import pytest
import torch
from safetensors import safe_open
from torch import nn

import engine.adapters.dora as dora_module
from engine.adapters import (
    LoRAConfig,
    adapter_params,
    disable_adapters,
    load_adapter,
    load_adapter_weights,
    load_adapted_model,
    merge,
    read_config,
    save_adapter,
    set_trainable,
)
from engine.adapters.dora import DoRALinear, dora_modules, inject_dora
from engine.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_weights
from engine.errors import InputError
from kernels.backend import force_triton
from kernels.nf4 import dequantize_nf4
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.loading import load_model
from models.quantized import NF4Linear
from tests.engine.adapters.hf_reference import hf_model, ids
from tests.tolerances import LOGITS_FP32_ATOL, assert_close

DORA = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_dora=True)




@torch.no_grad()
def randomize(modules, seed=1, b_std=0.1, m_std=0.2):
    """B ~ N(0, b_std²) and the magnitude scaled by 1 + N(0, m_std²): the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in modules:
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * b_std)
        m.lora_magnitude_vector.mul_(1 + m_std * torch.randn(m.lora_magnitude_vector.shape, generator=g))


def fp64_dora(x, w, bias, a, b, m, s):
    """y = (m / ‖W + s·B·A‖, detached) ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + bias, all in fp64."""
    norm = torch.linalg.norm(w + s * b.detach() @ a.detach(), dim=1).detach()
    y = (m / norm) * (x @ w.t() + s * (x @ a.t()) @ b.t())
    return y if bias is None else y + bias


def dora_layer(n_out, n_in, bias, nf4, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias)
    layer = DoRALinear(NF4Linear.from_linear(base) if nf4 else base, r=5, alpha=7.0)
    randomize([layer], seed)
    return layer


# ---------------------------------------------------------------------------- the layer

@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("triton", [False, True])
def test_forward_and_every_gradient_match_the_fp64_formula(triton, bias, nf4):
    n_out, n_in = (64, 96) if nf4 else (29, 37)
    layer = dora_layer(n_out, n_in, bias, nf4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, n_in, generator=g, requires_grad=True)
    dy = torch.randn(2, 7, n_out, generator=g)
    if triton:
        with force_triton():
            y = layer(x)
    else:
        y = layer(x)
    y.backward(dy)
    w = dequantize_nf4(layer.base.weight_nf4, torch.float32) if nf4 else layer.base.weight
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    bias64 = None if layer.base.bias is None else layer.base.bias.double()
    expected = fp64_dora(leaves[0], w.double(), bias64, *leaves[1:], layer.scale)
    expected.backward(dy.double())
    assert (expected - (x.double() @ w.double().t() + (0 if bias64 is None else bias64))).abs().max() > 1e-2
    assert_close(y, expected, torch.float32, "y")
    for name, ours, ref in zip(("dx", "dA", "dB", "dm"), (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector),
                               leaves):
        assert ours.grad.dtype == torch.float32
        assert ref.grad.abs().max() > 0, name
        assert_close(ours.grad, ref.grad, torch.float32, name)


def test_fresh_layer_equals_its_base_and_disabled_layer_is_the_base():
    torch.manual_seed(0)
    base = nn.Linear(23, 17)
    layer = DoRALinear(base, r=3, alpha=6.0)  # PEFT's init: B = 0, m = ‖W‖
    x = torch.randn(4, 23)
    assert_close(layer.lora_magnitude_vector, torch.linalg.norm(base.weight, dim=1), torch.float32, "m at init")
    assert_close(layer(x), base(x), torch.float32, "fresh layer")
    randomize([layer])
    assert (layer(x) - base(x)).abs().max() > 1e-2
    layer.adapter_enabled = False
    assert torch.equal(layer(x), base(x))


def test_dropout_is_on_the_low_rank_path_only():
    """In training with p > 0: y = g ⊙ (x Wᵀ + s·drop(x) Aᵀ Bᵀ) + b, the mask the LoRA op draws."""
    from kernels.lora import lora_linear_ref

    layer = dora_layer(19, 31, bias=True, nf4=False).train()
    layer.dropout = 0.3
    x = torch.randn(5, 31)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    z = lora_linear_ref(x, layer.base.weight, layer.lora_A, layer.lora_B, layer.scale, 0.3, True)
    g = layer.lora_magnitude_vector / torch.linalg.norm(layer.base.weight + layer.delta_weight(), dim=1)
    assert_close(y, z * g + layer.base.bias, torch.float32, "dropout")
    assert (y - layer.eval()(x)).abs().max() > 1e-3  # the mask did change something


@pytest.mark.parametrize("nf4", [False, True])
def test_merged_layer_computes_what_the_adapter_computes(nf4):
    layer = dora_layer(64, 96, bias=True, nf4=nf4)
    x = torch.randn(3, 96)
    merged = layer.merged()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert_close(merged(x), layer(x), torch.float32, "merged vs adapter", atol=1e-5)


# ---------------------------------------------------------------------------- the norm cache

def tiny_dora_model(quant=False):
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if quant:
        from models.quantized import quantize_linears
        quantize_linears(model)
    inject_dora(model, DORA)
    set_trainable(model)
    randomize(dora_modules(model).values())
    return model.train()


@pytest.mark.parametrize("fused", [False, True])  # fused AdamW (the engine's) does not bump _version
@pytest.mark.parametrize("checkpointing", [False, True])
def test_norm_is_computed_once_per_step_across_micro_batches(monkeypatch, checkpointing, fused):
    model = tiny_dora_model()
    model.gradient_checkpointing = checkpointing
    n_modules = len(dora_modules(model))
    calls = []
    real = dora_module.dora_weight_norm
    monkeypatch.setattr(dora_module, "dora_weight_norm", lambda *a: calls.append(1) or real(*a))
    opt = torch.optim.AdamW(adapter_params(model).values(), lr=1e-2, fused=fused)
    batch = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    per_step = []
    for _ in range(3):
        before = len(calls)
        for micro in (batch, batch.flip(0)):  # two micro-batches (forward, recompute, backward)
            model(micro).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        per_step.append(len(calls) - before)
    # step 1 reuses the norm computed at injection (its B was set in place: one recompute each);
    # after each optimizer step, one per module in the next step's first forward
    assert per_step == [n_modules] * 3, per_step
    cached = {name: m.weight_norm() for name, m in dora_modules(model).items()}
    for name, m in dora_modules(model).items():  # the cached norm is the norm of the current A, B
        assert_close(cached[name], torch.linalg.norm(m.base.weight + m.delta_weight(), dim=1), torch.float32, name)


# ---------------------------------------------------------------------------- PEFT both ways

def our_dora_adapter(hf_dir, out, cfg=DORA, quantize=None):
    model = load_model(hf_dir, quantize=quantize)
    torch.manual_seed(2)
    inject_dora(model, cfg)
    randomize(dora_modules(model).values())
    save_adapter(model, cfg, out, str(hf_dir), metadata={"run": "dora"})
    return model.eval()


@pytest.mark.parametrize("cfg", [DORA, LoRAConfig(r=3, alpha=5, target_modules=("q_proj", "v_proj", "down_proj"),
                                                  use_rslora=True, use_dora=True)])
def test_our_dora_adapter_on_peft_gives_our_logits(hf_dir, tmp_path, cfg):
    model = our_dora_adapter(hf_dir, tmp_path / "ours", cfg)
    with torch.no_grad():
        ours = model(ids())
        theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "ours").eval()(ids()).logits
        base = hf_model(hf_dir)(ids()).logits
    assert (theirs - base).abs().max() > 1e-2
    assert_close(theirs, ours, torch.float32, "PEFT logits with our DoRA adapter", atol=LOGITS_FP32_ATOL)
    written = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert written["use_dora"] is True and written["peft_type"] == "LORA"
    # the tensors are keyed exactly as PEFT writes a DoRA adapter of the same config
    peft_cfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, use_rslora=cfg.use_rslora, use_dora=True,
                               target_modules=cfg.target_modules if isinstance(cfg.target_modules, str)
                               else list(cfg.target_modules))
    peft.get_peft_model(hf_model(hf_dir), peft_cfg).save_pretrained(tmp_path / "peft")
    with safe_open(str(tmp_path / "ours" / WEIGHTS_NAME), "pt") as a, \
            safe_open(str(tmp_path / "peft" / WEIGHTS_NAME), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert any(k.endswith(".lora_magnitude_vector") for k in a.keys())
        for k in a.keys():
            assert a.get_tensor(k).shape == b.get_tensor(k).shape, k


def test_peft_dora_adapter_loads_in_ours_with_peft_logits(hf_dir, tmp_path):
    torch.manual_seed(4)
    pm = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(r=4, lora_alpha=6, target_modules="all-linear",
                                                               use_dora=True, lora_dropout=0.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = pm.eval()(ids()).logits
        base = hf_model(hf_dir)(ids()).logits
        model = load_model(hf_dir)
        cfg = load_adapter(model, tmp_path / "peft")
        ours = model.eval()(ids())
        loaded = load_adapted_model(hf_dir, tmp_path / "peft")(ids())
    assert cfg.use_dora and cfg.method == "dora" and read_config(tmp_path / "peft").use_dora
    assert len(dora_modules(model)) == 14
    assert (theirs - base).abs().max() > 1e-2
    assert_close(ours, theirs, torch.float32, "our logits with PEFT's DoRA adapter", atol=LOGITS_FP32_ATOL)
    assert_close(loaded, theirs, torch.float32, "load_adapted_model", atol=LOGITS_FP32_ATOL)


def test_merge_gives_the_adapter_logits(hf_dir, tmp_path):
    model = our_dora_adapter(hf_dir, tmp_path / "a")
    with torch.no_grad():
        adapted = model(ids())
        with disable_adapters(model):
            base = model(ids())
        report = merge(model)
        merged = model(ids())
    assert len(report.merged) == 14 and not dora_modules(model)
    assert (adapted - base).abs().max() > 1e-2
    assert_close(merged, adapted, torch.float32, "merged logits", atol=LOGITS_FP32_ATOL)


def test_qdora_on_nf4_base_forward_save_load_and_merge(hf_dir, tmp_path):
    """NF4 bases: the adapted model equals a dense DoRA model on the dequantized weights; the
    folder reloads onto an NF4 base with the same logits; merging gives them too."""
    model = our_dora_adapter(hf_dir, tmp_path / "q", quantize="nf4")
    assert all(isinstance(m.base, NF4Linear) for m in dora_modules(model).values())
    dense = load_model(hf_dir)
    for name, m in dora_modules(model).items():  # the same base, dequantized
        dense.get_submodule(name).weight.data.copy_(dequantize_nf4(m.base.weight_nf4, torch.float32))
    load_adapter(dense, tmp_path / "q")
    reloaded = load_adapted_model(hf_dir, tmp_path / "q", quantize="nf4")
    with torch.no_grad():
        ours = model(ids())
        assert_close(ours, dense.eval()(ids()), torch.float32, "QDoRA vs dense DoRA", atol=LOGITS_FP32_ATOL)
        assert_close(reloaded(ids()), ours, torch.float32, "QDoRA reloaded", atol=LOGITS_FP32_ATOL)
        report = merge(model)
        assert len(report.dequantized) == 14
        assert_close(model(ids()), ours, torch.float32, "QDoRA merged", atol=LOGITS_FP32_ATOL)


# ---------------------------------------------------------------------------- folders

def test_resume_weights_round_trip_and_mismatch_errors(hf_dir, tmp_path):
    saved = our_dora_adapter(hf_dir, tmp_path / "a")
    fresh = load_model(hf_dir)
    torch.manual_seed(9)
    inject_dora(fresh, DORA)
    load_adapter_weights(fresh, tmp_path / "a")
    for (n1, p1), (n2, p2) in zip(adapter_params(saved).items(), adapter_params(fresh).items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert any(n.endswith("lora_magnitude_vector") for n in adapter_params(fresh))
    other = load_model(hf_dir)
    inject_dora(other, LoRAConfig(r=4, alpha=8, target_modules=("q_proj",), use_dora=True))
    with pytest.raises(InputError, match="its DoRA modules differ from the model's"):
        load_adapter_weights(other, tmp_path / "a")


def test_bad_magnitude_is_refused_before_the_model_changes(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    our_dora_adapter(hf_dir, tmp_path / "a", LoRAConfig(r=2, alpha=4, target_modules=("q_proj",), use_dora=True))
    path = tmp_path / "a" / WEIGHTS_NAME
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    save_file({**tensors, key: tensors[key][:5].contiguous()}, str(path))
    model = load_model(hf_dir)
    with pytest.raises(InputError, match=r"q_proj\.lora_magnitude_vector has shape \(5,\), expected \(64,\)"):
        load_adapter(model, tmp_path / "a")
    save_file({k: v for k, v in tensors.items() if k != key}, str(path))
    with pytest.raises(InputError, match=r"q_proj\.lora_magnitude_vector\.weight is missing"):
        load_adapter(model, tmp_path / "a")
    assert not dora_modules(model)


def test_lora_only_readers_refuse_dora_folders(hf_dir, tmp_path):
    """Multi-adapter serving, combine and GGUF export read folders with the LoRA-only readers."""
    our_dora_adapter(hf_dir, tmp_path / "a", LoRAConfig(r=2, alpha=4, target_modules=("q_proj",), use_dora=True))
    with pytest.raises(InputError, match="use_dora=True is not supported"):
        read_adapter_config(tmp_path / "a")
    with pytest.raises(InputError, match="not a LoRA A/B weight"):
        read_adapter_weights(tmp_path / "a")


# ---------------------------------------------------------------------------- training runs

def test_sft_with_peft_dora_lowers_loss_and_resumes_exactly(tiny_model_dir, tmp_path):
    """``--peft dora`` through the SFT recipe (dispatch only): the loss falls, the folder holds the
    magnitudes, and a run resumed from its step-3 checkpoint gives the same losses and adapter."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file

    from engine.config import TrainConfig
    from engine.recipes import sft
    from engine.run.metrics import read_metrics

    lines = (Path(__file__).resolve().parents[3] / "examples" / "license_qa.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:16]) + "\n")

    def config(output, **kw):
        return TrainConfig(**dict(model=str(tiny_model_dir), data=str(tmp_path / "train.jsonl"), output=str(output),
                                  peft="dora", max_steps=6, batch_size=4, lr=1e-2, warmup_steps=1, max_len=128,
                                  lora_r=4, lora_alpha=8, lora_dropout=0.1, seed=7, eval_every=0, save_every=3,
                                  keep_checkpoints=5) | kw)

    def losses(output):
        return [r["loss"] for r in read_metrics(output / "metrics.jsonl") if r["kind"] == "train"]

    run = sft.train(config(tmp_path / "full"), progress=False)
    full = losses(tmp_path / "full")
    assert len(full) == 6 and full[-1] < full[0] and all(map(math.isfinite, full))
    assert len(dora_modules(run.model)) == 14
    adapter = tmp_path / "full" / "adapter"
    assert json.loads((adapter / CONFIG_NAME).read_text())["use_dora"] is True
    a = load_file(str(adapter / WEIGHTS_NAME))
    assert sum(k.endswith("lora_magnitude_vector") for k in a) == 14

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000003", part / "checkpoints" / "step-000003")
    shutil.copy(tmp_path / "full" / "config.json", part / "config.json")
    kept = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["step"] <= 3]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    sft.train(config(part, resume=True), progress=False)
    assert losses(part) == full
    b = load_file(str(part / "adapter" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_with_peft_dora_trains_against_the_adapter_off_reference(tiny_model_dir, tmp_path):
    """DPO through the dispatch: a fresh DoRA layer equals its base (B = 0, m = ‖W‖), so the first
    step's loss is log 2 (policy = reference, the adapter off); the run moves the loss and saves
    DoRA's magnitudes."""
    from safetensors.torch import load_file

    from engine.recipes import dpo
    from engine.recipes.dpo import DPOOptions
    from engine.run.metrics import read_metrics
    from tests.engine.recipes.pref_files import write_pref_subset
    from tests.engine.recipes.test_dpo import dpo_config

    data = write_pref_subset(tmp_path, 8, 2)
    run = dpo.train(dpo_config(tiny_model_dir, data, tmp_path / "run", peft="dora", max_steps=3, lora_dropout=0.0),
                    progress=False, options=DPOOptions())
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 3 and abs(losses[0] - math.log(2)) < 1e-5, losses
    assert losses[-1] != losses[0] and len(dora_modules(run.model)) == 14
    saved = load_file(str(tmp_path / "run" / "adapter" / WEIGHTS_NAME))
    assert sum(k.endswith("lora_magnitude_vector") for k in saved) == 14
