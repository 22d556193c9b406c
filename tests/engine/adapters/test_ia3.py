"""IA³ (`engine.adapters.ia3`, `engine.adapters.ia3_method`): the layer's output and every gradient
against the plain fp64 formula, our model against HF PEFT's (both ways, through the folder), merge,
bad folders, and SFT / DPO runs with ``--peft ia3``."""

import json

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.adapters import (
    adapter_params,
    config_from_flags,
    disable_adapters,
    inject_adapter,
    load_adapter,
    load_adapter_weights,
    merge,
    read_adapter_metadata,
    remove_adapters,
    save_adapter,
    set_trainable,
)
from engine.adapters.base import adapter_modules
from engine.adapters.ia3 import IA3Config, IA3Linear, ia3_modules
from engine.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from engine.config import TrainConfig
from engine.errors import InputError
from kernels.nf4 import dequantize_nf4
from models.loading import load_model
from models.quantized import NF4Linear
from tests.engine.adapters.hf_reference import hf_model, ids
from tests.tolerances import LOGITS_FP32_ATOL, assert_close, tol


# ---------------------------------------------------------------------------- the layer vs the formula

def _layer(kind: str, feedforward: bool, bias: bool, dtype: torch.dtype, seed: int = 0) -> IA3Linear:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(37, 23, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(23, 37, generator=g) / 37 ** 0.5)
        if bias:
            base.bias.copy_(torch.randn(23, generator=g))
    base = base.to(dtype)
    if kind == "nf4":
        base = NF4Linear.from_linear(base)
    layer = IA3Linear(base, feedforward)
    assert torch.equal(layer.ia3_l, torch.ones(37 if feedforward else 23))  # PEFT's init
    with torch.no_grad():
        layer.ia3_l.copy_(1 + 0.5 * torch.randn(layer.ia3_l.shape, generator=g))
    return layer


def _dense(layer: IA3Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    base = layer.base
    w = dequantize_nf4(base.weight_nf4, dtype=torch.float32) if isinstance(base, NF4Linear) else base.weight
    return w.double(), None if base.bias is None else base.bias.double()


def _formula(x, w, b, l, feedforward, grad):
    """fp64: y and the chain rule of the module docstring (G = dL/dy): dL/dx and dL/dl."""
    x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    if feedforward:  # y = (x ⊙ l) Wᵀ + b
        y = (x2 * l) @ w.T + (0 if b is None else b)
        gu = g2 @ w
        return y, gu * l, (x2 * gu).sum(0)
    z = x2 @ w.T + (0 if b is None else b)  # y = z ⊙ l
    return z * l, (g2 * l) @ w, (g2 * z).sum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("feedforward, bias", [(False, False), (False, True), (True, False), (True, True)])
def test_layer_output_and_gradients_match_the_fp64_formula(kind, feedforward, bias, dtype):
    layer = _layer(kind, feedforward, bias, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 37, generator=g).to(dtype).requires_grad_(True)
    grad = torch.randn(3, 5, 23, generator=g).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and layer.ia3_l.dtype == torch.float32
    y.backward(grad)
    w, b = _dense(layer)
    ref_y, ref_dx, ref_dl = _formula(x.detach().double(), w, b, layer.ia3_l.detach().double(), feedforward,
                                     grad.double())
    assert_close(y.reshape(-1, 23), ref_y, dtype, "y")
    assert_close(x.grad.reshape(-1, 37), ref_dx, dtype, "dL/dx")
    # l's gradient lands in fp32; it sums 15 rows of products formed in the compute dtype
    t = tol(dtype)
    assert_close(layer.ia3_l.grad, ref_dl, dtype, "dL/dl", atol=4 * t.atol, rtol=t.rtol)
    assert layer.ia3_l.grad.dtype == torch.float32 and layer.ia3_l.grad.abs().sum() > 0


def test_disabled_layer_is_its_base_and_merged_layer_computes_the_same():
    for kind in ("dense", "nf4"):
        for feedforward in (False, True):
            layer = _layer(kind, feedforward, bias=True, dtype=torch.float32)
            x = torch.randn(4, 37, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                layer.adapter_enabled = False
                assert torch.equal(layer(x), layer.base(x))
                layer.adapter_enabled = True
                merged = layer.merged()
                assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
                assert_close(merged(x), layer(x), torch.float32, f"merged {kind} feedforward={feedforward}")


# ---------------------------------------------------------------------------- against HF PEFT



def randomize_l(model, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ia3_modules(model).values():
            m.ia3_l.copy_(1 + std * torch.randn(m.ia3_l.shape, generator=g))


def flags(**overrides):
    return TrainConfig(model="m", data="d", output="o", peft="ia3", **overrides)


def test_flags_give_peft_defaults_or_the_given_list():
    assert config_from_flags(flags()) == IA3Config(("k_proj", "v_proj", "down_proj"), ("down_proj",))
    assert config_from_flags(flags(target_modules="q_proj,up_proj")) == IA3Config(("q_proj", "up_proj"), ())
    assert config_from_flags(flags(target_modules="v_proj, down_proj")) == IA3Config(("v_proj", "down_proj"),
                                                                                    ("down_proj",))
    assert not hasattr(config_from_flags(flags()), "dropout")  # IA³ has none: the run sets none
    with pytest.raises(InputError, match="not among target_modules"):
        IA3Config(("k_proj",), ("down_proj",))


@pytest.mark.parametrize("cfg", [
    IA3Config(),
    IA3Config(("q_proj", "up_proj", "down_proj", "o_proj"), ("down_proj",)),
    IA3Config("all-linear", ("gate_proj", "up_proj"), exclude_modules=("layers.1.self_attn.q_proj",)),
], ids=["peft-defaults", "list", "all-linear"])
def test_our_adapter_on_peft_gives_our_logits(hf_dir, tmp_path, cfg):
    model = load_model(hf_dir)
    names = inject_adapter(model, cfg)
    randomize_l(model)
    save_adapter(model, cfg, tmp_path / "a", str(hf_dir), metadata={"run": "ia3"})
    with torch.no_grad():
        ours = model(ids())
        pmodel = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "a").eval()
        theirs = pmodel(ids()).logits
        base = hf_model(hf_dir)(ids()).logits
    assert (theirs - base).abs().max() > 1e-2  # the adapter really changes the output
    print(f"max |PEFT - ours| logits ({len(names)} IA³ modules): {(theirs - ours).abs().max().item():.2e}")
    assert_close(theirs, ours, torch.float32, "PEFT logits with our IA³ adapter", atol=LOGITS_FP32_ATOL)
    peft_ff = {n.removeprefix("base_model.model.") for n, m in pmodel.named_modules()
               if getattr(m, "is_feedforward", False)}
    assert peft_ff == {n for n, m in ia3_modules(model).items() if m.feedforward}
    written = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert written["peft_type"] == "IA3" and written["base_model_name_or_path"] == str(hf_dir)
    assert read_adapter_metadata(tmp_path / "a") == {"run": "ia3"}
    with safe_open(str(tmp_path / "a" / WEIGHTS_NAME), "pt") as f:
        assert sorted(f.keys()) == sorted(f"base_model.model.{n}.ia3_l" for n in names)


@pytest.mark.parametrize("targets, feedforward", [
    (None, None),  # PEFT's defaults for Llama
    (["q_proj", "v_proj", "up_proj", "down_proj"], ["up_proj", "down_proj"]),
    (r".*\.(k_proj|gate_proj|down_proj)", r".*\.down_proj"),
])
def test_peft_adapter_loaded_by_us_gives_peft_logits(hf_dir, tmp_path, targets, feedforward):
    pcfg = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")
    pmodel = peft.get_peft_model(hf_model(hf_dir), pcfg).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        expected = pmodel(ids()).logits
        base = hf_model(hf_dir)(ids()).logits
    assert (expected - base).abs().max() > 1e-2
    pmodel.save_pretrained(tmp_path / "peft_ia3")

    model = load_model(hf_dir)
    cfg = load_adapter(model, tmp_path / "peft_ia3")
    assert isinstance(cfg, IA3Config)
    assert len(ia3_modules(model)) == sum(1 for n, _ in pmodel.named_parameters() if "ia3_l" in n)
    with torch.no_grad():
        ours = model(ids())
    print(f"max |ours - PEFT| logits: {(ours - expected).abs().max().item():.2e}")
    assert_close(ours, expected, torch.float32, "our logits with PEFT's IA³ adapter", atol=LOGITS_FP32_ATOL)


def test_resume_weights_and_key_spellings(hf_dir, tmp_path):
    model = load_model(hf_dir)
    inject_adapter(model, IA3Config())
    randomize_l(model)
    save_adapter(model, IA3Config(), tmp_path / "a", None)
    path = tmp_path / "a" / WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:  # PEFT's in-memory spelling, without the prefix
        tensors = {k.removeprefix("base_model.model.") + ".default": f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path))
    fresh = load_model(hf_dir)
    inject_adapter(fresh, IA3Config())
    load_adapter_weights(fresh, tmp_path / "a")
    for (n1, p1), (n2, p2) in zip(adapter_params(model).items(), adapter_params(fresh).items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def _rewrite(path, fn):
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(tensors), str(path))


K0 = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
D1 = "base_model.model.model.layers.1.mlp.down_proj.ia3_l"


@pytest.mark.parametrize("breakage, message", [
    ("no_weights", "adapter_model.safetensors: not found"),
    ("fan_in_fan_out", "adapter_config.json: fan_in_fan_out=true is not supported"),
    ("modules_to_save", "adapter_config.json: modules_to_save"),
    ("target", "adapter_config.json: IA³ target module 'w_proj' matches no module"),
    ("transposed", r"adapter_model.safetensors: .*layers\.0\.self_attn\.k_proj\.ia3_l has shape \(1, 32\), "
                   r"expected \(32, 1\)"),
    ("feedforward_flipped", r"layers\.1\.mlp\.down_proj\.ia3_l has shape \(64, 1\), expected \(1, 80\)"),
    ("nan", r"adapter_model.safetensors: .*k_proj\.ia3_l has 1 non-finite"),
    ("unknown_module", r"adapter_model.safetensors: a vector for 'model.layers.7.self_attn.k_proj'"),
    ("missing", r"adapter_model.safetensors: no vector for targeted module 'model.layers.1.mlp.down_proj'"),
    ("foreign", r"adapter_model.safetensors: tensor '.*lora_A.weight' is not an IA³ vector"),
])
def test_bad_folders_raise_input_error_and_leave_the_model_untouched(hf_dir, tmp_path, breakage, message):
    adapter = tmp_path / "a"
    model = load_model(hf_dir)
    inject_adapter(model, IA3Config())
    save_adapter(model, IA3Config(), adapter, None)
    config_path, weights_path = adapter / CONFIG_NAME, adapter / WEIGHTS_NAME
    raw = json.loads(config_path.read_text())
    if breakage == "no_weights":
        weights_path.unlink()
    elif breakage in ("fan_in_fan_out", "modules_to_save"):
        config_path.write_text(json.dumps({**raw, breakage: True if breakage == "fan_in_fan_out" else ["lm_head"]}))
    elif breakage == "target":
        config_path.write_text(json.dumps({**raw, "target_modules": ["k_proj", "w_proj", "down_proj"]}))
    elif breakage == "transposed":
        _rewrite(weights_path, lambda t: {**t, K0: t[K0].T.contiguous()})
    elif breakage == "feedforward_flipped":
        _rewrite(weights_path, lambda t: {**t, D1: torch.ones(64, 1)})
    elif breakage == "nan":
        _rewrite(weights_path, lambda t: {**t, K0: t[K0].index_fill(0, torch.tensor([3]), float("nan"))})
    elif breakage == "unknown_module":
        _rewrite(weights_path, lambda t: {**t, K0.replace(".0.", ".7."): torch.ones(32, 1)})
    elif breakage == "missing":
        _rewrite(weights_path, lambda t: {k: v for k, v in t.items() if k != D1})
    elif breakage == "foreign":
        _rewrite(weights_path, lambda t: {**t, K0.replace("ia3_l", "lora_A.weight"): torch.zeros(2, 64)})
    fresh = load_model(hf_dir)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(InputError, match=message):
        load_adapter(fresh, adapter)
    assert not adapter_modules(fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


# ---------------------------------------------------------------------------- merge

@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_equals_base_plus_adapter(hf_dir, quantize):
    model = load_model(hf_dir, quantize=quantize)
    inject_adapter(model, IA3Config("all-linear", ("down_proj", "up_proj")))
    randomize_l(model)
    with torch.no_grad():
        adapted = model(ids())
        report = merge(model)
        merged = model(ids())
    assert not adapter_modules(model) and len(report.merged) == 14
    assert (len(report.dequantized) == 14) == (quantize == "nf4")
    print(f"max |merged - adapted| logits ({quantize or 'dense'} base): {(merged - adapted).abs().max().item():.2e}")
    assert_close(merged, adapted, torch.float32, f"merged vs adapted logits ({quantize or 'dense'})",
                 atol=LOGITS_FP32_ATOL)


def test_disable_and_remove_give_the_base(hf_dir):
    model = load_model(hf_dir)
    with torch.no_grad():
        base = model(ids())
        inject_adapter(model, IA3Config())
        assert torch.equal(model(ids()), base)  # l = ones: a fresh adapter is the base
        randomize_l(model)
        assert (model(ids()) - base).abs().max() > 1e-2
        with disable_adapters(model):
            assert torch.equal(model(ids()), base)
        assert set_trainable(model) == sum(p.numel() for p in adapter_params(model).values()) == 2 * (32 + 32 + 80)
        remove_adapters(model)
        assert torch.equal(model(ids()), base)


# ---------------------------------------------------------------------------- runs with --peft ia3

def test_sft_with_ia3_lowers_held_out_loss_and_its_folder_loads(tiny_model_dir, qa_data, tmp_path):
    """8 SFT steps of IA³ on the tiny random model (a learning rate for vectors that start at 1):
    the held-out loss falls; the saved folder loads through `load_adapter` into the same logits."""
    from engine.run.metrics import read_metrics
    from tests.engine.recipes.test_sft import run_config, train

    run = train(run_config(tiny_model_dir, qa_data, tmp_path / "run", peft="ia3", lr=1.0, max_steps=8))
    evals = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    before, after = evals[0], evals[-1]
    print(f"IA³ SFT held-out loss: {before:.5f} -> {after:.5f}")
    assert after < before - 0.01, (before, after)
    modules = ia3_modules(run.model)
    assert len(modules) == 3 * 2 and all(not torch.equal(m.ia3_l, torch.ones_like(m.ia3_l)) for m in modules.values())
    assert read_adapter_metadata(tmp_path / "run" / "adapter")["method"] == "sft"
    fresh = load_model(tiny_model_dir)
    assert isinstance(load_adapter(fresh, tmp_path / "run" / "adapter"), IA3Config)
    tokens = torch.randint(3, 49152, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert_close(fresh.eval()(tokens), run.model.eval()(tokens), torch.float32, "reloaded IA³ adapter")


def test_dpo_with_ia3_uses_the_base_as_reference_and_resumes_exactly(tiny_model_dir, tmp_path):
    """DPO through the dispatch: with the adapter off the model is exactly the base (the
    reference); a run learns (margins move off 0) and a resume from its step-2 checkpoint
    (`load_adapter_weights`) ends with the same adapter, bit for bit."""
    import shutil

    from safetensors.torch import load_file

    from engine.losses.causal_lm import completion_logps
    from engine.recipes.dpo_reference import ReferencePolicy
    from tests.engine.recipes.pref_files import write_pref_subset
    from tests.engine.recipes.test_dpo import dpo_config, lines, pair_batch, run_dpo

    (tmp_path / "prefs").mkdir()
    data = write_pref_subset(tmp_path / "prefs", 16, 4)
    batch = pair_batch(tiny_model_dir, data[0])
    base_logps, _ = completion_logps(load_model(tiny_model_dir), batch)
    model = load_model(tiny_model_dir)
    inject_adapter(model, IA3Config())
    set_trainable(model)
    randomize_l(model)
    ref_logps, _ = ReferencePolicy(model, frozen_initial=False).logps(batch)
    assert torch.equal(ref_logps, base_logps)
    assert not torch.allclose(completion_logps(model, batch)[0], base_logps, atol=1e-3)

    full, part = tmp_path / "full", tmp_path / "part"
    run_dpo(dpo_config(tiny_model_dir, data, full, peft="ia3", lr=0.3, max_steps=4, save_every=2,
                       keep_checkpoints=5))
    train_lines = lines(full, "train")
    assert len(train_lines) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_lines)
    assert any(r["rewards/margins"] != 0 for r in train_lines[1:])  # the policy moved off the reference
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000002", part / "checkpoints" / "step-000002")
    shutil.copy(full / "config.json", part / "config.json")
    from engine.run.metrics import read_metrics
    kept = [r for r in read_metrics(full / "metrics.jsonl") if r["step"] <= 2]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    run_dpo(dpo_config(tiny_model_dir, data, part, peft="ia3", lr=0.3, max_steps=4, save_every=2, resume=True))
    assert lines(part, "train") == train_lines
    a, b = (load_file(str(p / "adapter" / WEIGHTS_NAME)) for p in (full, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.endswith(".ia3_l") for k in a)


def test_merge_cli_folds_an_ia3_folder_into_the_logits_of_base_plus_adapter(hf_dir, tmp_path):
    """`engine.merge` (merge_to_folder) takes an IA³ folder through the dispatch: the merged folder's
    logits are the adapted model's."""
    from engine.adapters import load_adapted_model
    from engine.merge import merge_to_folder

    model = load_model(hf_dir)
    inject_adapter(model, IA3Config())
    randomize_l(model)
    save_adapter(model, IA3Config(), tmp_path / "a", str(hf_dir))
    result = merge_to_folder(str(hf_dir), str(tmp_path / "a"), tmp_path / "merged", dtype=torch.float32)
    assert len(result.report.merged) == 6
    with torch.no_grad():
        adapted = load_adapted_model(hf_dir, tmp_path / "a")(ids())
        merged = load_model(tmp_path / "merged").eval()(ids())
    assert_close(merged, adapted, torch.float32, "merged folder vs base + IA³", atol=LOGITS_FP32_ATOL)


def test_ia3_on_an_nf4_base_then_dpo_from_its_folder(tiny_model_dir, qa_data, tmp_path):
    """--peft ia3 --quant nf4: IA³ wraps NF4 linears and trains; DPO with --init-adapter on that
    folder (checked on a meta model, then loaded) starts with the SFT policy as its reference."""
    from engine.recipes import dpo
    from engine.recipes.dpo import DPOOptions
    from tests.engine.recipes.pref_files import write_pref_subset
    from tests.engine.recipes.test_dpo import dpo_config, lines
    from tests.engine.recipes.test_sft import run_config, train, train_losses

    run = train(run_config(tiny_model_dir, qa_data, tmp_path / "sft", peft="ia3", quant="nf4", lr=1.0, max_steps=2,
                           eval_data=None))
    modules = ia3_modules(run.model)
    assert len(modules) == 6 and all(isinstance(m.base, NF4Linear) for m in modules.values())
    assert all(torch.isfinite(torch.tensor(train_losses(tmp_path / "sft"))))
    (tmp_path / "prefs").mkdir()
    data = write_pref_subset(tmp_path / "prefs", 8, 4)
    chained = dpo.train(dpo_config(tiny_model_dir, data, tmp_path / "dpo", max_steps=1,
                                   init_adapter=str(tmp_path / "sft" / "adapter")), progress=False,
                        options=DPOOptions())
    assert len(ia3_modules(chained.model)) == 6
    first = lines(tmp_path / "dpo", "eval")[0]
    assert first["step"] == 0 and first["eval/rewards/margins"] == 0
