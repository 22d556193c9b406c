"""PEFT-format adapters both ways, with HF PEFT on transformers' Llama as the oracle."""

import json

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from engine.adapters import (
    LoRAConfig,
    adapter_params,
    inject_lora,
    load_adapter,
    load_adapter_weights,
    lora_modules,
    read_adapter_metadata,
    save_adapter,
    set_trainable,
)
from engine.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from engine.errors import InputError
import kernels.lora_group
from kernels.backend import force_triton
from models.loading import load_model
from tests.engine.adapters.hf_reference import hf_model, ids
from tests.tolerances import LOGITS_FP32_ATOL, assert_close




def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def our_adapter(hf_dir, out, cfg, metadata=None):
    model = load_model(hf_dir)
    torch.manual_seed(2)
    inject_lora(model, cfg)
    randomize_lora(model)
    save_adapter(model, cfg, out, str(hf_dir), metadata=metadata)
    return model


@pytest.mark.parametrize("cfg", [
    LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
    LoRAConfig(r=3, alpha=5, target_modules=("q_proj", "v_proj", "down_proj"), use_rslora=True),
])
def test_our_adapter_on_peft_gives_our_logits(hf_dir, tmp_path, cfg):
    model = our_adapter(hf_dir, tmp_path / "adapter", cfg, metadata={"run": "test", "step": 3})
    with torch.no_grad():
        ours = model(ids())
        theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "adapter").eval()(ids()).logits
        base = hf_model(hf_dir)(ids()).logits
    assert (theirs - base).abs().max() > 1e-2  # the adapter really changes the output
    assert_close(theirs, ours, torch.float32, "PEFT logits with our adapter", atol=LOGITS_FP32_ATOL)
    assert read_adapter_metadata(tmp_path / "adapter") == {"run": "test", "step": 3}
    written = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert written["peft_type"] == "LORA" and written["r"] == cfg.r and written["lora_alpha"] == cfg.alpha
    assert written["use_rslora"] == cfg.use_rslora and written["base_model_name_or_path"] == str(hf_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folders left


@pytest.mark.parametrize("cfg", [
    LoRAConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1),
    LoRAConfig(r=3, alpha=5, target_modules=("q_proj", "v_proj", "down_proj"), dropout=0.1),
])
def test_adapter_trained_through_grouped_projections_loads_in_peft(hf_dir, tmp_path, cfg, monkeypatch):
    """On the kernel path (the Triton interpreter here) q/k/v and gate/up run as grouped ops
    (`kernels.lora_group`), adapters on all or on a subset of them: a training step through them,
    then the adapter saved per module, PEFT gives the logits our grouped forward gives."""
    model = load_model(hf_dir)
    torch.manual_seed(2)
    inject_lora(model, cfg)
    set_trainable(model)
    randomize_lora(model)
    model.train()
    grouped = []
    real_apply = kernels.lora_group.GroupedLoRALinearFunction.apply
    monkeypatch.setattr(kernels.lora_group.GroupedLoRALinearFunction, "apply",
                        lambda *args: grouped.append(len(args[1].members)) or real_apply(*args))
    with force_triton():
        loss = model(ids()).float().logsumexp(-1).mean()
    loss.backward()
    assert grouped == [3, 2] * model.config.num_hidden_layers, f"grouped ops (members each): {grouped}"
    with torch.no_grad():
        for p in adapter_params(model).values():
            assert p.grad is not None and p.grad.abs().sum() > 0, "no gradient reached an adapter"
            p -= 0.1 * p.grad
    model.eval()
    save_adapter(model, cfg, tmp_path / "adapter", str(hf_dir))
    with torch.no_grad(), force_triton():
        ours = model(ids())
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "adapter").eval()(ids()).logits
    assert_close(theirs, ours, torch.float32, "PEFT logits with an adapter trained through grouped projections",
                 atol=LOGITS_FP32_ATOL)


@pytest.mark.parametrize("target_modules, extra", [
    ("all-linear", {}),
    (["q_proj", "v_proj", "down_proj"], {"use_rslora": True, "rank_pattern": {"down_proj": 2},
                                         "alpha_pattern": {"layers.1.self_attn.v_proj": 3}}),
])
def test_peft_adapter_loaded_by_us_gives_peft_logits(hf_dir, tmp_path, target_modules, extra):
    torch.manual_seed(3)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=target_modules,
                           task_type="CAUSAL_LM", **extra)
    pmodel = peft.get_peft_model(hf_model(hf_dir), pcfg).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        expected = pmodel(ids()).logits
    pmodel.save_pretrained(tmp_path / "peft_adapter")

    model = load_model(hf_dir)
    cfg = load_adapter(model, tmp_path / "peft_adapter")
    assert cfg.r == 4 and cfg.alpha == 8 and cfg.dropout == pytest.approx(0.1)
    if extra:
        assert model.model.layers[0].mlp.down_proj.r == 2
        assert model.model.layers[1].self_attn.v_proj.alpha == 3
        assert model.model.layers[0].self_attn.v_proj.alpha == 8
    with torch.no_grad():
        assert_close(model(ids()), expected, torch.float32, "our logits with PEFT's adapter", atol=LOGITS_FP32_ATOL)


@pytest.mark.parametrize("spelling", ["default", "no_prefix"])
def test_peft_key_spellings_accepted(hf_dir, tmp_path, spelling):
    cfg = LoRAConfig(r=2, target_modules=("o_proj",))
    model = our_adapter(hf_dir, tmp_path / "a", cfg)
    path = tmp_path / "a" / WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if spelling == "default":
        tensors = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    else:
        tensors = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    save_file(tensors, str(path))
    fresh = load_model(hf_dir)
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(ids()), model(ids()))


def test_resume_weights_into_injected_model(hf_dir, tmp_path):
    cfg = LoRAConfig(r=2, target_modules=("q_proj", "up_proj"))
    model = our_adapter(hf_dir, tmp_path / "a", cfg)
    fresh = load_model(hf_dir)
    inject_lora(fresh, cfg)
    load_adapter_weights(fresh, tmp_path / "a")
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def _rewrite(path, fn):
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(tensors), str(path))


@pytest.mark.parametrize("breakage, message", [
    ("no_config", "adapter_config.json: not found"),
    ("no_weights", "adapter_model.safetensors: not found"),
    ("bad_json", "not valid JSON"),
    # use_dora now loads as DoRA (tests/engine/adapters/test_dora.py), which needs the magnitudes;
    # the LoRA-only readers' refusal of DoRA is test_dora.py::test_lora_only_readers_refuse_dora_folders
    ("dora", r"q_proj\.lora_magnitude_vector\.weight is missing"),
    ("shape", r"layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(64, 2\), expected \(2, 64\)"),
    ("unknown_module", "'model.layers.7.self_attn.q_proj'"),
    ("missing_B", r"model\.layers\.1\.self_attn\.q_proj\.lora_B\.weight is missing"),
    ("embedding", "not a LoRA A/B weight"),
])
def test_bad_adapters_raise_input_error_and_leave_model_untouched(hf_dir, tmp_path, breakage, message):
    adapter = tmp_path / "a"
    our_adapter(hf_dir, adapter, LoRAConfig(r=2, target_modules=("q_proj",)))
    config_path, weights_path = adapter / CONFIG_NAME, adapter / WEIGHTS_NAME
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    if breakage == "no_config":
        config_path.unlink()
    elif breakage == "no_weights":
        weights_path.unlink()
    elif breakage == "bad_json":
        config_path.write_text("{ not json")
    elif breakage == "dora":
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    elif breakage == "shape":
        _rewrite(weights_path, lambda t: {**t, f"{q0}.lora_A.weight": t[f"{q0}.lora_A.weight"].T.contiguous()})
    elif breakage == "unknown_module":
        _rewrite(weights_path, lambda t: {**t, f"{q0.replace('.0.', '.7.')}.lora_A.weight": torch.zeros(2, 64),
                                          f"{q0.replace('.0.', '.7.')}.lora_B.weight": torch.zeros(64, 2)})
    elif breakage == "missing_B":
        _rewrite(weights_path, lambda t: {k: v for k, v in t.items() if "layers.1" not in k or "lora_A" in k})
    elif breakage == "embedding":
        _rewrite(weights_path, lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2)})
    model = load_model(hf_dir)
    with pytest.raises(InputError, match=message):
        load_adapter(model, adapter)
    assert not lora_modules(model)


# ---------------------------------------------------------------------------- reward models (SEQ_CLS)

def hf_seq_cls(path):
    """transformers' sequence classifier (num_labels=1) on the folder; pad_token_id None, so each
    sequence, scored alone, is pooled at its last position."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = None
    return model.eval()


def our_scores(model, rows):
    with torch.no_grad():  # one row at a time: the last position is the last token
        return torch.stack([model.score(model.hidden_states(row[None])[0, -1]) for row in rows])


def test_peft_reward_adapter_loaded_by_us_gives_peft_scores(hf_dir, tmp_path):
    """PEFT's own SEQ_CLS adapter (it lists modules_to_save ["classifier", "score"]): we load its LoRA
    and its head, and score every sequence as PEFT does."""
    torch.manual_seed(3)
    pmodel = peft.get_peft_model(hf_seq_cls(hf_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                     task_type="SEQ_CLS")).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        expected = torch.stack([pmodel(row[None]).logits[0, 0] for row in ids()])
    pmodel.save_pretrained(tmp_path / "peft_rm")
    assert set(json.loads((tmp_path / "peft_rm" / CONFIG_NAME).read_text())["modules_to_save"]) == {"classifier", "score"}
    model = load_model(hf_dir)
    cfg = load_adapter(model, tmp_path / "peft_rm")
    assert cfg.modules_to_save == ("score",) and model.score.weight.shape == (1, 64)
    assert "score.weight" in adapter_params(model)
    assert_close(our_scores(model, ids()), expected, torch.float32, "our scores with PEFT's reward adapter",
                 atol=LOGITS_FP32_ATOL)


def test_plain_adapter_config_is_causal_lm_and_has_no_head(hf_dir, tmp_path):
    our_adapter(hf_dir, tmp_path / "a", LoRAConfig(r=2, target_modules=("q_proj",)))
    written = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert written["task_type"] == "CAUSAL_LM" and written["modules_to_save"] is None
    with safe_open(str(tmp_path / "a" / WEIGHTS_NAME), "pt") as f:
        assert all(".lora_" in k for k in f.keys())


@pytest.mark.parametrize("breakage, message", [
    ("other_module", r"modules_to_save=\['lm_head'\] is not supported \(LoRA on linear layers only"),
    ("causal_lm_task", r"is a sequence-classification head, but task_type is 'CAUSAL_LM'"),
    ("no_head_weight", r"no base_model\.model\.score\.weight"),
    ("unlisted_head", r"holds a 'score' head .* does not list in modules_to_save"),
    ("head_shape", r"a reward head is a \(1, hidden\) float weight"),
])
def test_bad_reward_adapters_raise_input_error(hf_dir, tmp_path, breakage, message):
    adapter = tmp_path / "a"
    model = our_adapter(hf_dir, adapter, LoRAConfig(r=2, target_modules=("q_proj",)))
    config_path, weights_path = adapter / CONFIG_NAME, adapter / WEIGHTS_NAME
    config = json.loads(config_path.read_text())
    head = {"base_model.model.score.weight": torch.randn(1, model.config.hidden_size)}
    reward = {"task_type": "SEQ_CLS", "modules_to_save": ["score"]}
    if breakage == "other_module":
        config_path.write_text(json.dumps({**config, **reward, "modules_to_save": ["lm_head"]}))
    elif breakage == "causal_lm_task":
        config_path.write_text(json.dumps({**config, "modules_to_save": ["score"]}))
        _rewrite(weights_path, lambda t: {**t, **head})
    elif breakage == "no_head_weight":
        config_path.write_text(json.dumps({**config, **reward}))
    elif breakage == "unlisted_head":
        _rewrite(weights_path, lambda t: {**t, **head})
    elif breakage == "head_shape":
        config_path.write_text(json.dumps({**config, **reward}))
        _rewrite(weights_path, lambda t: {**t, "base_model.model.score.weight": torch.randn(2, 64)})
    fresh = load_model(hf_dir)
    with pytest.raises(InputError, match=message):
        load_adapter(fresh, adapter)
    assert not lora_modules(fresh) and not hasattr(fresh, "score")
