"""--lora-init against HF PEFT 0.21 (its own layer code; for LoftQ, which PEFT runs only through
bitsandbytes on CUDA, its loop with our NF4 quantizer), the model at init, and the saved form of
PiSSA/OLoRA: a plain rank-2r LoRA on the ORIGINAL base, loaded by PEFT and by us, and resumed."""

import functools
import json

import peft
import pytest
import torch
import transformers
from peft.utils.loftq_utils import _low_rank_decomposition
from safetensors.torch import load_file, save_file
from torch import nn

from engine.adapters import (LoRAConfig, disable_adapters, inject_adapter, load_adapter, load_adapter_weights,
                             lora_modules, save_adapter)
from engine.adapters.lora import dense_base_weight
from engine.adapters.lora_init import initialise_module, loftq_factors
from engine.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from engine.errors import InputError
from kernels.backend import force_triton
from kernels.nf4 import dequantize_nf4, quantize_nf4
from models.loading import load_model
from models.quantized import NF4Linear, quantize_linears
from tests.engine.adapters.hf_reference import hf_model, ids
from tests.engine.recipes.test_dpo import dpo_config, lines, pref_data, run_dpo  # noqa: F401 (fixture)
from tests.engine.recipes.test_sft import run_config, train, train_losses
from tests.tolerances import LOGITS_FP32_ATOL, assert_close

SHAPES = [(16, 24), (29, 13)]  # (out, in): wide and tall, odd sizes


class OneLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.q_proj(x)


def ours(shape, init, r, alpha, rslora=False):
    model = OneLinear(*shape)
    inject_adapter(model, LoRAConfig(r=r, alpha=alpha, target_modules=("q_proj",), use_rslora=rslora, init=init))
    return model.q_proj


def peft_layer(shape, init, r, alpha, rslora=False):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"], init_lora_weights=init,
                             use_rslora=rslora)
    return peft.get_peft_model(OneLinear(*shape), config).base_model.model.q_proj


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("init, r, alpha, rslora", [("pissa", 4, 8, False), ("pissa", 5, 3, True),
                                                     ("olora", 4, 8, False), ("olora", 3, 7, True)])
def test_pissa_and_olora_match_peft(shape, init, r, alpha, rslora):
    """A, B and the residual base equal PEFT's (same fp32 SVD/QR call: no sign ambiguity), and the
    layer still computes W: W_res + s B A = W."""
    mine, theirs = ours(shape, init, r, alpha, rslora), peft_layer(shape, init, r, alpha, rslora)
    assert_close(mine.lora_A, theirs.lora_A["default"].weight, name=f"{init} A")
    assert_close(mine.lora_B, theirs.lora_B["default"].weight, name=f"{init} B")
    assert_close(mine.base.weight, theirs.base_layer.weight, name=f"{init} residual base")
    original = OneLinear(*shape).q_proj.weight
    assert_close(mine.base.weight + mine.delta_weight(), original, name="W_res + s B A")
    assert (mine.base.weight - original).abs().max() > 1e-2  # the base really changed
    assert torch.equal(mine.lora_A0, mine.lora_A) and torch.equal(mine.lora_B0, mine.lora_B)
    assert not mine.lora_A0.requires_grad and "lora_A0" not in mine.state_dict()


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_matches_peft(shape):
    """A ~ N(0, 1/r) as PEFT draws it (same RNG state), B = 0."""
    mine, theirs = ours(shape, "default", 4, 8), peft_layer(shape, True, 4, 8)
    torch.manual_seed(3)
    initialise_module(mine, "gaussian")
    torch.manual_seed(3)
    theirs.reset_lora_parameters("default", "gaussian")
    assert_close(mine.lora_A, theirs.lora_A["default"].weight, name="gaussian A")
    assert torch.equal(mine.lora_B, torch.zeros_like(mine.lora_B))
    assert abs(float(mine.lora_A.detach().std()) - 1 / 4) < 0.05


def peft_loftq(weight, r, num_iter):
    """peft.utils.loftq_utils.loftq_init's loop, with our NF4 quantizer where PEFT calls bitsandbytes."""
    w = weight.float()
    res = w.clone()
    for i in range(num_iter):
        deq = dequantize_nf4(quantize_nf4(res), dtype=torch.float32)
        res = w - deq
        out = _low_rank_decomposition(res, reduced_rank=r)
        L, R = out["L"], out["R"]
        if i + 1 == num_iter:
            break
        res = w - L @ R
    return deq, R, L


@pytest.mark.parametrize("num_iter", [1, 2])
def test_loftq_matches_peft_loop(num_iter):
    """For alpha = r our LoftQ is PEFT's; for another alpha s B A is the same product (PEFT forgets
    the 1/s there, its issue #1982), and Q + s B A is closer to W than Q alone."""
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(5))
    deq, A_peft, B_peft = peft_loftq(weight, 4, num_iter)
    q, A, B = loftq_factors(weight, 4, 1.0, quantize_nf4, num_iter)
    assert_close(dequantize_nf4(q, dtype=torch.float32), deq, name="LoftQ base")
    assert_close(A, A_peft, name="LoftQ A")
    assert_close(B, B_peft, name="LoftQ B")
    q2, A2, B2 = loftq_factors(weight, 4, 2.5, quantize_nf4, num_iter)
    assert_close(2.5 * B2 @ A2, B_peft @ A_peft, name="s B A for alpha/r = 2.5")
    plain = (weight - deq).norm()
    corrected = (weight - deq - B @ A).norm()
    assert corrected < 0.97 * plain, (float(corrected), float(plain))


# ----------------------------------------------------------------------------- whole models



def fresh(hf_dir, init, quant=False, **cfg):
    model = load_model(hf_dir)
    if quant:
        quantize_linears(model)
    torch.manual_seed(2)
    config = LoRAConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, **cfg, "init": init})
    inject_adapter(model, config)
    return model.eval(), config


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_dense_model_at_init_equals_the_base_and_so_does_it_with_adapters_off(hf_dir, init):
    """At init the model is the base; trained, with its adapters off (DPO's reference, KL to the
    base), it is still the ORIGINAL base, not PiSSA's residual: per module and through the grouped
    q/k/v, gate/up kernels (the Triton interpreter here)."""
    model, _ = fresh(hf_dir, init)
    with torch.no_grad():
        expected = load_model(hf_dir)(ids())
        assert_close(model(ids()), expected, name=f"logits at {init} init", atol=1e-5)
        train_a_little(model)
        assert (model(ids()) - expected).abs().max() > 1e-3
        with disable_adapters(model):
            assert_close(model(ids()), expected, name=f"{init}, adapters off", atol=1e-5)
            with force_triton():
                assert_close(model(ids()), expected, name=f"{init}, adapters off, grouped kernels", atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_nf4_base_gets_the_requantized_residual(hf_dir, init):
    """On an NF4 base the residual of the dequantized weight is re-quantized (same block size and
    double quantization): the layer differs from its NF4 base by the rounding of the residual only."""
    model, _ = fresh(hf_dir, init, quant=True)
    base = load_model(hf_dir)
    quantize_linears(base)
    worst = 0.0
    for name, m in lora_modules(model).items():
        assert isinstance(m.base, NF4Linear) and hasattr(m.base, "weight_nested_absmax")
        before, _ = dense_base_weight(base.get_submodule(name))
        residual = before - m.delta_weight()
        assert torch.equal(m.base.weight_packed, quantize_nf4(residual).packed)
        after, _ = dense_base_weight(m.base)
        worst = max(worst, float((after + m.delta_weight() - before).abs().max()))
    # the NF4 step at these weights (|w| <~ 0.1, 16 levels per 64-block absmax) is ~1e-2
    assert 0 < worst < 3e-2, worst


def test_loftq_quantizes_the_dense_base_and_lowers_its_error(hf_dir):
    """LoftQ on a dense base: the base becomes NF4(W) exactly (one iteration: what --quant nf4
    loads), and base + s B A is closer to W than NF4(W) for every layer."""
    model, _ = fresh(hf_dir, "loftq", alpha=4)
    dense = load_model(hf_dir)
    for name, m in lora_modules(model).items():
        w = dense.get_submodule(name).weight
        assert isinstance(m.base, NF4Linear) and torch.equal(m.base.weight_packed, quantize_nf4(w).packed)
        deq = dequantize_nf4(m.base.weight_nf4, dtype=torch.float32)
        assert (w - deq - m.delta_weight()).norm() < (w - deq).norm(), name
    with pytest.raises(InputError, match="dense base"):
        fresh(hf_dir, "loftq", quant=True)


def train_a_little(model):
    """A, B moved as training would (so B A - B₀ A₀ != 0)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.add_(torch.randn(m.lora_A.shape, generator=g) * 0.05)
            m.lora_B.add_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


@pytest.mark.parametrize("init, cfg", [("pissa", {}), ("olora", {"use_rslora": True, "alpha": 5}),
                                       ("pissa", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}})])
def test_converted_adapter_on_the_original_base(hf_dir, tmp_path, init, cfg):
    """Saved, a PiSSA/OLoRA adapter is a plain rank-2r LoRA with the same scales; PEFT and we load it
    onto the ORIGINAL base and get the trained model's logits; a resume restores A and B exactly."""
    model, config = fresh(hf_dir, init, **cfg)
    train_a_little(model)
    save_adapter(model, config, tmp_path / "a", str(hf_dir))
    written = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert written["r"] == 8 and written["init_lora_weights"] is True
    expected_alpha = config.alpha * (2 ** 0.5 if config.use_rslora else 2)
    assert abs(written["lora_alpha"] - expected_alpha) < 1e-12
    assert written["rank_pattern"] == {k: 2 * v for k, v in config.rank_pattern.items()}
    assert written["alpha_pattern"] == {k: 2 * v for k, v in config.alpha_pattern.items()}
    with torch.no_grad():
        trained = model(ids())
        theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "a").eval()(ids()).logits
        plain = load_model(hf_dir)
        load_adapter(plain, tmp_path / "a")
        mine = plain.eval()(ids())
    assert (trained - hf_model(hf_dir)(ids()).logits).abs().max() > 1e-3  # training changed the model
    assert_close(theirs, trained, name="PEFT on the original base", atol=LOGITS_FP32_ATOL)
    assert_close(mine, trained, name="ours on the original base", atol=LOGITS_FP32_ATOL)

    again, _ = fresh(hf_dir, init, **cfg)  # a resumed run: the same init, then the folder's weights
    load_adapter_weights(again, tmp_path / "a")
    for name, m in lora_modules(again).items():
        assert torch.equal(m.lora_A, model.get_submodule(name).lora_A), name
        assert torch.equal(m.lora_B, model.get_submodule(name).lora_B), name


def test_resume_refuses_a_folder_from_another_init(hf_dir, tmp_path):
    model, config = fresh(hf_dir, "pissa")
    train_a_little(model)
    save_adapter(model, config, tmp_path / "a", str(hf_dir))
    tensors = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key][-1, 0] += 1e-2  # the A₀ half
    save_file(tensors, str(tmp_path / "a" / WEIGHTS_NAME))
    with pytest.raises(InputError, match="initial half"):
        load_adapter_weights(fresh(hf_dir, "pissa")[0], tmp_path / "a")
    with pytest.raises(InputError, match="converted adapter"):  # a rank-r plain LoRA folder
        plain, plain_cfg = fresh(hf_dir, "default")
        save_adapter(plain, plain_cfg, tmp_path / "p", str(hf_dir))
        load_adapter_weights(fresh(hf_dir, "olora")[0], tmp_path / "p")


# ----------------------------------------------------------------------------- SFT runs


def trained_logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.parametrize("init, ratio", [("pissa", None), ("olora", 4.0)])
def test_sft_adapter_loads_on_the_original_base_and_resume_is_exact(tiny_model_dir, qa_data, tmp_path, init, ratio):
    """A few SFT steps with --lora-init (and LoRA+ for OLoRA): HF PEFT and we, loading the saved
    (converted) adapter onto the ORIGINAL base, give the trained model's logits; a run resumed
    from its step-2 checkpoint gives the same losses and adapter bitwise."""
    import shutil

    from engine.adapters import load_adapted_model
    from engine.run.metrics import read_metrics

    config = functools.partial(run_config, lora_init=init, loraplus_ratio=ratio, max_steps=4, save_every=2)
    full = train(config(tiny_model_dir, qa_data, tmp_path / "full", keep_checkpoints=5))
    losses = train_losses(tmp_path / "full")
    assert len(losses) == 4 and losses[-1] < losses[0]
    if ratio is not None:
        assert sorted(g["lr_scale"] for g in full.optimizer.adamw.param_groups) == [1.0, ratio]
    tokens = torch.randint(3, 49152, (2, 11), generator=torch.Generator().manual_seed(3))
    ours_trained = trained_logits(full.model, tokens)
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base = hf(tokens).logits
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "full" / "adapter").eval()(tokens).logits
    assert (ours_trained - base).abs().max() > 1e-3
    assert_close(theirs, ours_trained, name="PEFT on the original base", atol=LOGITS_FP32_ATOL)
    loaded = load_adapted_model(tiny_model_dir, tmp_path / "full" / "adapter")
    assert_close(trained_logits(loaded, tokens), ours_trained, name="ours on the original base", atol=LOGITS_FP32_ATOL)

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000002", part / "checkpoints" / "step-000002")
    shutil.copy(tmp_path / "full" / "config.json", part / "config.json")
    kept = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["step"] <= 2]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    train(config(tiny_model_dir, qa_data, part, resume=True))
    assert train_losses(part) == losses  # bitwise
    a = load_file(str(tmp_path / "full" / "adapter" / WEIGHTS_NAME))
    b = load_file(str(part / "adapter" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_loftq_on_nf4_trains_and_its_adapter_goes_on_the_nf4_base(tiny_model_dir, qa_data, tmp_path):
    """--quant nf4 --lora-init loftq: every block linear ends NF4 (the adapted ones from LoftQ, the
    base NF4(W) as --quant nf4 loads it), and the saved plain adapter on that NF4 base gives the
    trained model's logits."""
    from engine.adapters import load_adapted_model

    run = train(run_config(tiny_model_dir, qa_data, tmp_path / "q", quant="nf4", lora_init="loftq", max_steps=3,
                           target_modules="q_proj,v_proj,down_proj"))
    assert all(isinstance(m.base, NF4Linear) for m in lora_modules(run.model).values())
    assert all(isinstance(run.model.get_submodule(f"model.layers.0.{n}"), NF4Linear)
               for n in ("self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))
    assert json.loads((tmp_path / "q" / "adapter" / CONFIG_NAME).read_text())["r"] == 4  # not converted
    tokens = torch.randint(3, 49152, (2, 11), generator=torch.Generator().manual_seed(3))
    loaded = load_adapted_model(tiny_model_dir, tmp_path / "q" / "adapter", quantize="nf4")
    assert_close(trained_logits(loaded, tokens), trained_logits(run.model, tokens), name="loftq on NF4(W)",
                 atol=LOGITS_FP32_ATOL)



def test_dpo_with_pissa_has_the_original_base_as_its_reference(tiny_model_dir, pref_data, tmp_path):
    """DPO's reference is the policy with its adapters off: for PiSSA that is the original model
    (not the residual), so at step 0 every implicit reward is exactly 0; the run trains and saves."""
    run_dpo(dpo_config(tiny_model_dir, pref_data, tmp_path / "run", max_steps=2, lora_init="pissa"))
    first = lines(tmp_path / "run", "eval")[0]
    assert first["step"] == 0
    assert first["eval/rewards/chosen"] == first["eval/rewards/rejected"] == first["eval/rewards/margins"] == 0
    assert json.loads((tmp_path / "run" / "adapter" / CONFIG_NAME).read_text())["r"] == 8
