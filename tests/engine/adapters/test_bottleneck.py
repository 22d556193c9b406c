"""Bottleneck adapters (`engine.adapters.bottleneck`, `bottleneck_format`, `bottleneck_method`):
the adapter and every gradient against the fp64 formula with a hand-derived backward; a model
with adapters against the base (exactly, at init) and against a hand-written block loop; the KV
cache, MLP chunks and checkpointing paths; the folder both ways, bad folders; NF4 bases;
merging refused; SFT with ``--peft bottleneck``."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.adapters import (
    NotMergeable,
    adapter_modules,
    adapter_params,
    disable_adapters,
    folder_method,
    inject_adapter,
    load_adapted_model,
    load_adapter,
    load_adapter_weights,
    merge,
    read_config,
    remove_adapters,
    save_adapter,
    set_trainable,
)
from engine.adapters.bottleneck import BottleneckAdapter, BottleneckConfig, bottleneck_modules
from engine.adapters.bottleneck_format import FORMAT, PEFT_TYPE
from engine.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_adapter_metadata
from engine.errors import InputError
from models.config import LlamaConfig
from models.llama import build_attention_mask
from models.loading import save_model
from models.quantized import NF4Linear, quantize_linears
from tests.tolerances import assert_close
from tools.random_checkpoint import random_model

ROOT = Path(__file__).resolve().parents[3]
CONFIG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                     tie_word_embeddings=False)
SUBLAYERS = {"houlsby": 2 * 2, "pfeiffer": 2}  # wrapped sublayers of the 2-block model


# ---------------------------------------------------------------------------- the formula, by hand

def act_and_derivative(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """act(z) and act'(z), written out (fp64)."""
    if name == "relu":
        return z.clamp(min=0), (z > 0).to(z.dtype)
    if name == "tanh":
        t = torch.tanh(z)
        return t, 1 - t * t
    if name == "silu":
        s = torch.sigmoid(z)
        return z * s, s * (1 + z * (1 - s))
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return z * cdf, cdf + z * pdf
    raise ValueError(name)


def reference_adapter(y, D, bd, U, bu, act: str, g):
    """y' = y + act(y Dᵀ + b_d) Uᵀ + b_u and the gradients for ∂L/∂y' = g, all in fp64:
    ∂b_u = Σg, ∂U = gᵀa, ∂z = (gU)⊙act'(z), ∂b_d = Σ∂z, ∂D = ∂zᵀy, ∂y = g + ∂z D."""
    y, D, bd, U, bu, g = (t.detach().double() for t in (y, D, bd, U, bu, g))
    y2, g2 = y.reshape(-1, y.shape[-1]), g.reshape(-1, g.shape[-1])
    z = y2 @ D.T + bd
    a, da = act_and_derivative(act, z)
    out = y2 + a @ U.T + bu
    dz = (g2 @ U) * da
    grads = {"y": (g2 + dz @ D).reshape(y.shape), "adapter_down.weight": dz.T @ y2, "adapter_down.bias": dz.sum(0),
             "adapter_up.weight": g2.T @ a, "adapter_up.bias": g2.sum(0)}
    return out.reshape(y.shape), grads


def randomize(module: BottleneckAdapter, seed: int, std: float = 0.5) -> None:
    """Non-zero U and both biases (D keeps its init), so that every gradient is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.adapter_parameters().items():
            if name != "adapter_down.weight":
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, hidden, dim", [((3, 5), 24, 7), ((1, 11), 40, 1)])
def test_adapter_forward_and_every_gradient_match_the_formula(act, dtype, shape, hidden, dim):
    """The identity as sublayer, so y = h: output and ∂h, ∂D, ∂b_d, ∂U, ∂b_u against the fp64
    formula (computed from the same dtype-rounded weights); master weights and their grads fp32."""
    torch.manual_seed(0)
    adapter = BottleneckAdapter(torch.nn.Identity(), hidden, dim, act)
    randomize(adapter, seed=1)
    h = torch.randn(*shape, hidden).to(dtype).requires_grad_()
    g = torch.randn(*shape, hidden).to(dtype)
    out = adapter(h)
    out.backward(g)
    params = adapter.adapter_parameters()
    rounded = {k: p.detach().to(dtype) for k, p in params.items()}  # what the forward computes with
    expected, grads = reference_adapter(h, rounded["adapter_down.weight"], rounded["adapter_down.bias"],
                                        rounded["adapter_up.weight"], rounded["adapter_up.bias"], act, g)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "output")
    assert_close(h.grad, grads["y"], dtype, "grad h")
    for name, p in params.items():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert p.grad.abs().sum() > 0, name
        # a gradient sums over every token: its budget is one rounding of that sum in ``dtype``
        assert_close(p.grad, grads[name], dtype, f"grad {name}",
                     atol=None if dtype == torch.float32 else 2e-2 * max(1.0, grads[name].abs().max().item()))


def test_dropout_acts_on_the_adapter_input_in_training_only():
    """Training: y + act(drop(y) Dᵀ + b_d) Uᵀ + b_u with the mask F.dropout draws from the same
    seed; eval: no dropout. The sublayer's output y itself is never dropped."""
    torch.manual_seed(0)
    adapter = BottleneckAdapter(torch.nn.Identity(), 16, 4, "relu", dropout=0.3)
    randomize(adapter, seed=2)
    y = torch.randn(4, 6, 16)
    p = adapter.adapter_parameters()

    def formula(x):
        return y + F.relu(x @ p["adapter_down.weight"].T + p["adapter_down.bias"]) @ p["adapter_up.weight"].T \
            + p["adapter_up.bias"]

    torch.manual_seed(5)
    got = adapter.train()(y)
    torch.manual_seed(5)
    mask = F.dropout(torch.ones_like(y), 0.3, training=True)  # 0 or 1/(1-p), as the module draws it
    assert 0 < int((mask == 0).sum()) < mask.numel()
    with torch.no_grad():
        assert_close(got, formula(y * mask), torch.float32, "train")
        assert_close(adapter.eval()(y), formula(y), torch.float32, "eval")


def test_disabled_adapter_is_the_sublayer_and_is_not_mergeable():
    torch.manual_seed(0)
    sublayer = torch.nn.Linear(8, 8)
    adapter = BottleneckAdapter(sublayer, 8, 3)
    randomize(adapter, seed=3)
    x = torch.randn(2, 8)
    assert not torch.equal(adapter(x), sublayer(x))
    adapter.adapter_enabled = False
    assert torch.equal(adapter(x), sublayer(x))
    assert adapter.unwrapped() is sublayer and not adapter.mergeable
    assert not sublayer.weight.requires_grad
    with pytest.raises(NotMergeable):
        adapter.merged()
    with pytest.raises(InputError, match="already has a bottleneck adapter"):
        BottleneckAdapter(adapter, 8, 3)


@pytest.mark.parametrize("bad", [dict(adapter_dim=0), dict(placement="both"), dict(non_linearity="swish"),
                                 dict(dropout=1.0)])
def test_config_refuses_bad_values(bad):
    with pytest.raises(InputError):
        BottleneckConfig(**bad)


# ---------------------------------------------------------------------------- the model

@pytest.fixture
def base():
    return random_model(CONFIG, seed=0)


def ids(B: int = 2, T: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def adapted(base_model, placement: str, seed: int = 0, dim: int = 5, act: str = "relu", quant: bool = False):
    """A copy of the base with fresh adapters, then non-zero U and biases."""
    model = random_model(CONFIG, seed=0)
    model.load_state_dict(base_model.state_dict())
    if quant:
        quantize_linears(model)
    torch.manual_seed(seed)
    inject_adapter(model, BottleneckConfig(adapter_dim=dim, placement=placement, non_linearity=act))
    for i, m in enumerate(bottleneck_modules(model).values()):
        randomize(m, seed=100 + i)
    return model


def hand_written_logits(base_model, adapters: dict[str, BottleneckAdapter], input_ids: torch.Tensor):
    """The causal LM written out over the base model's own blocks (no padding, no cache):
    h = x + A_attn(attn(norm(x))); out = h + A_mlp(mlp(norm(h))), A(y) = y + act(y Dᵀ + b_d) Uᵀ + b_u
    in plain torch with the adapters' parameters (A = identity for an unwrapped sublayer)."""
    def A(name: str, y: torch.Tensor) -> torch.Tensor:
        if name not in adapters:
            return y
        m = adapters[name]
        p = m.adapter_parameters()
        return y + m.act(y @ p["adapter_down.weight"].T + p["adapter_down.bias"]) @ p["adapter_up.weight"].T \
            + p["adapter_up.bias"]

    B, T = input_ids.shape
    inner = base_model.model
    positions = torch.arange(T).expand(B, T)
    mask = build_attention_mask(None, None, None, 0, T, input_ids.device)
    h = inner.embed_tokens(input_ids)
    for i, layer in enumerate(inner.layers):
        h = h + A(f"model.layers.{i}.self_attn",
                  layer.self_attn(layer.input_layernorm(h), positions, inner.inv_freq, mask, None))
        h = h + A(f"model.layers.{i}.mlp", layer.mlp(layer.post_attention_layernorm(h)))
    return base_model.lm_head(inner.norm(h))


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapters_at_init_leave_the_model_exactly_the_base(base, placement):
    model = random_model(CONFIG, seed=0)
    names = inject_adapter(model, BottleneckConfig(adapter_dim=6, placement=placement))
    kinds = ("self_attn", "mlp") if placement == "houlsby" else ("mlp",)
    assert names == [f"model.layers.{i}.{k}" for i in range(2) for k in kinds]
    assert set_trainable(model) == len(names) * (6 * 32 + 6 + 32 * 6 + 32)
    with torch.no_grad():
        assert torch.equal(model(ids()), base(ids()))


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_logits_and_adapter_gradients_match_the_hand_written_blocks(base, placement):
    model = adapted(base, placement)
    set_trainable(model)
    adapters = bottleneck_modules(model)
    assert len(adapters) == SUBLAYERS[placement]
    x = ids()
    logits = model(x)
    expected = hand_written_logits(base, adapters, x)
    assert (logits - base(x)).abs().max() > 1e-2  # the adapters matter
    assert_close(logits, expected, torch.float32, "logits")
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
    params = adapter_params(model)
    got = torch.autograd.grad((logits * g).sum(), list(params.values()))
    want = torch.autograd.grad((expected * g).sum(), list(params.values()))
    for name, a, b in zip(params, got, want):
        assert a.abs().sum() > 0, name
        assert_close(a, b, torch.float32, f"grad {name}")
    with disable_adapters(model), torch.no_grad():  # DPO's reference: the base
        assert torch.equal(model(x), base(x))
    remove_adapters(model)
    assert not adapter_modules(model)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_kv_cache_generation_matches_the_full_forward(base):
    """Prompt, then two tokens one at a time through the KV cache: the logits of a full forward."""
    model = adapted(base, "houlsby").eval()
    x = ids(2, 8)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 8)
        steps = [model(x[:, :6], cache=cache), model(x[:, 6:7], cache=cache), model(x[:, 7:8], cache=cache)]
    assert_close(torch.cat(steps, dim=1), full, torch.float32, "cached logits")


def test_mlp_chunks_and_checkpointing_give_the_plain_loss_and_gradients(base):
    """``mlp_chunk_tokens`` reaches the wrapped MLPs; with it and gradient checkpointing, in
    training, the loss and adapter gradients equal those of the plain forward."""
    model = adapted(base, "houlsby").train()
    set_trainable(model)
    x = ids(2, 9)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in adapter_params(model).items()}

    plain_loss, plain = loss_and_grads()
    model.mlp_chunk_tokens = 4
    assert model.mlp_chunk_tokens == 4 and model.model.layers[1].mlp.sublayer.chunk_tokens == 4
    model.gradient_checkpointing = True
    loss, grads = loss_and_grads()
    assert_close(loss, plain_loss, torch.float32, "loss")
    for name in plain:
        assert_close(grads[name], plain[name], torch.float32, name)


# ---------------------------------------------------------------------------- NF4 base

def test_nf4_base_at_init_is_the_nf4_base_and_logits_match_by_hand(base):
    nf4_base = random_model(CONFIG, seed=0)
    quantize_linears(nf4_base)
    model = adapted(base, "houlsby", quant=True)
    wrapped = bottleneck_modules(model)["model.layers.0.mlp"].sublayer
    assert isinstance(wrapped.down_proj, NF4Linear)
    x = ids()
    set_trainable(model)
    logits = model(x)
    assert_close(logits, hand_written_logits(nf4_base, bottleneck_modules(model), x), torch.float32, "NF4 logits")
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params(model).values())
    fresh = random_model(CONFIG, seed=0)
    quantize_linears(fresh)
    inject_adapter(fresh, BottleneckConfig(adapter_dim=4))
    with torch.no_grad():
        assert torch.equal(fresh(x), nf4_base(x))


# ---------------------------------------------------------------------------- the folder

@pytest.mark.parametrize("placement, act", [("houlsby", "relu"), ("pfeiffer", "gelu")])
def test_save_load_round_trip_gives_the_same_logits(base, tmp_path, placement, act):
    model = adapted(base, placement, act=act)
    cfg = BottleneckConfig(adapter_dim=5, placement=placement, non_linearity=act)
    save_adapter(model, cfg, tmp_path / "a", "tiny-base", metadata={"run": "test"})
    raw = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert raw["peft_type"] == PEFT_TYPE and raw["format"] == FORMAT and raw["format_version"] == 1
    assert (raw["adapter_dim"], raw["placement"], raw["non_linearity"], raw["hidden_size"]) == (5, placement, act, 32)
    assert raw["base_model_name_or_path"] == "tiny-base" and raw["modules"] == list(bottleneck_modules(model))
    tensors = load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert len(tensors) == 4 * SUBLAYERS[placement]
    assert tensors["base_model.model.model.layers.1.mlp.adapter_down.weight"].shape == (5, 32)
    assert tensors["base_model.model.model.layers.1.mlp.adapter_up.weight"].shape == (32, 5)
    assert read_adapter_metadata(tmp_path / "a") == {"run": "test"}
    assert folder_method(tmp_path / "a").name == "bottleneck" and read_config(tmp_path / "a") == cfg

    fresh = random_model(CONFIG, seed=0)
    assert load_adapter(fresh, tmp_path / "a") == cfg
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # resume: the same adapters already in place, weights copied in
    resumed = random_model(CONFIG, seed=0)
    inject_adapter(resumed, cfg)
    load_adapter_weights(resumed, tmp_path / "a")
    for name, p in adapter_params(model).items():
        assert torch.equal(adapter_params(resumed)[name], p)
    base_dir = tmp_path / "base"
    save_model(base, base_dir)
    with torch.no_grad():
        assert torch.equal(load_adapted_model(base_dir, tmp_path / "a")(x), model(x))


def test_merge_is_refused_by_merge_and_by_the_cli(base, tmp_path):
    model = adapted(base, "houlsby")
    before = {n: p.clone() for n, p in adapter_params(model).items()}
    with pytest.raises(NotMergeable, match="cannot be merged"):
        merge(model)
    assert {n: p for n, p in adapter_params(model).items()}.keys() == before.keys()
    save_model(base, tmp_path / "base")
    save_adapter(model, BottleneckConfig(adapter_dim=5), tmp_path / "adapter", str(tmp_path / "base"))
    result = subprocess.run([sys.executable, "-m", "engine.merge", "--model", str(tmp_path / "base"), "--adapter",
                             str(tmp_path / "adapter"), "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "bottleneck adapter" in lines[0] and "cannot be merged" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def _edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / CONFIG_NAME).read_text())
    for key, value in changes.items():
        if value is ...:
            raw.pop(key)
        else:
            raw[key] = value
    (folder / CONFIG_NAME).write_text(json.dumps(raw))


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(str(folder / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS_NAME))


KEY = "base_model.model.model.layers.0.mlp.adapter_up.weight"
CORRUPTIONS = {
    "format_version": (CONFIG_NAME, lambda f: _edit_config(f, format_version=2), "newer than this engine"),
    "format": (CONFIG_NAME, lambda f: _edit_config(f, format="other"), "format is"),
    "missing field": (CONFIG_NAME, lambda f: _edit_config(f, adapter_dim=...), "missing required field"),
    "unknown field": (CONFIG_NAME, lambda f: _edit_config(f, scaling=2.0), "unknown field"),
    "placement": (CONFIG_NAME, lambda f: _edit_config(f, placement="sideways"), "placement"),
    "placement mismatch": (CONFIG_NAME, lambda f: _edit_config(f, placement="pfeiffer"), "is not a sublayer"),
    "modules": (CONFIG_NAME, lambda f: _edit_config(f, modules=["model.layers.0.mlp"]), "modules differ"),
    "hidden size": (CONFIG_NAME, lambda f: _edit_config(f, hidden_size=64), "hidden_size"),
    "adapter_dim vs shapes": (WEIGHTS_NAME, lambda f: _edit_config(f, adapter_dim=6), "has shape"),
    "not json": (CONFIG_NAME, lambda f: (f / CONFIG_NAME).write_text("{"), "not valid JSON"),
    "nan": (WEIGHTS_NAME, lambda f: _edit_weights(f, lambda t: t[KEY].view(-1).__setitem__(0, math.nan)),
            "non-finite"),
    "missing tensor": (WEIGHTS_NAME, lambda f: _edit_weights(f, lambda t: t.pop(KEY)), "is missing"),
    "extra key": (WEIGHTS_NAME, lambda f: _edit_weights(f, lambda t: t.__setitem__("lm_head.weight", torch.ones(2))),
                  "not a bottleneck adapter weight"),
    "shape": (WEIGHTS_NAME, lambda f: _edit_weights(f, lambda t: t.__setitem__(KEY, torch.zeros(32, 4))), "has shape"),
    "int dtype": (WEIGHTS_NAME, lambda f: _edit_weights(
        f, lambda t: t.__setitem__(KEY, torch.zeros(32, 5, dtype=torch.int32))), "expected floats"),
    "head not listed": (WEIGHTS_NAME, lambda f: _edit_weights(
        f, lambda t: t.__setitem__("base_model.model.score.weight", torch.zeros(1, 32))), "reward head"),
    "head missing": (WEIGHTS_NAME, lambda f: _edit_config(f, task_type="SEQ_CLS", modules_to_save=["score"]),
                     "reward head"),
    "modules_to_save": (CONFIG_NAME, lambda f: _edit_config(f, modules_to_save=["lm_head"]), "modules_to_save"),
    "truncated": (WEIGHTS_NAME, lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:100]),
                  "cannot read safetensors"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupt_or_mismatched_folder_raises_input_error_before_touching_the_model(base, tmp_path, case):
    file, corrupt, message = CORRUPTIONS[case]
    folder = tmp_path / "a"
    save_adapter(adapted(base, "houlsby"), BottleneckConfig(adapter_dim=5), folder, None)
    corrupt(folder)
    model = random_model(CONFIG, seed=0)
    with pytest.raises(InputError, match=message) as err:
        load_adapter(model, folder)
    assert str(folder / file) in str(err.value)
    assert not adapter_modules(model)
    if case != "not json":  # resume checks the same
        inject_adapter(model, BottleneckConfig(adapter_dim=5))
        with pytest.raises(InputError, match=str(folder)):
            load_adapter_weights(model, folder)


# ---------------------------------------------------------------------------- training

def test_sft_with_peft_bottleneck_lowers_held_out_loss_and_resumes_exactly(tiny_model_dir, qa_data, tmp_path):
    """``--peft bottleneck`` through the SFT recipe (no method branch there): the held-out loss falls,
    the folder is ours, and a run resumed from its step-3 checkpoint repeats the losses bitwise."""
    from engine.config import TrainConfig
    from engine.recipes import sft
    from engine.run.metrics import read_metrics

    def config(output: Path, **extra) -> TrainConfig:
        return TrainConfig(model=str(tiny_model_dir), data=str(qa_data[0]), eval_data=str(qa_data[1]),
                           output=str(output), max_steps=6, batch_size=4, lr=1e-2, warmup_steps=1, max_len=192,
                           seed=7, eval_every=0, save_every=3, keep_checkpoints=5, peft="bottleneck",
                           adapter_dim=8, adapter_placement="houlsby", **extra)

    run = sft.train(config(tmp_path / "full"), progress=False)
    records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    evals = [r["loss"] for r in records if r["kind"] == "eval"]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 6 and evals[-1] < evals[0] - 0.03, evals
    assert len(bottleneck_modules(run.model)) == 4
    assert folder_method(tmp_path / "full" / "adapter").name == "bottleneck"

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000003", part / "checkpoints" / "step-000003")
    shutil.copy(tmp_path / "full" / "config.json", part / "config.json")
    kept = [r for r in records if r["step"] <= 3 and r["kind"] != "summary"]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    sft.train(config(part, resume=True), progress=False)
    assert [r["loss"] for r in read_metrics(part / "metrics.jsonl") if r["kind"] == "train"] == losses
    a = load_file(str(tmp_path / "full" / "adapter" / WEIGHTS_NAME))
    b = load_file(str(part / "adapter" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_trains_bottleneck_on_an_nf4_base(tiny_model_dir, qa_data, tmp_path):
    from engine.config import TrainConfig
    from engine.recipes import sft
    from engine.run.metrics import read_metrics

    cfg = TrainConfig(model=str(tiny_model_dir), data=str(qa_data[0]), output=str(tmp_path / "q"), max_steps=3,
                      batch_size=4, lr=1e-2, warmup_steps=1, max_len=192, seed=7, eval_every=0, save_every=0,
                      peft="bottleneck", adapter_dim=8, adapter_placement="pfeiffer", quant="nf4")
    run = sft.train(cfg, progress=False)
    modules = bottleneck_modules(run.model)
    assert len(modules) == 2 and all(isinstance(m.sublayer.down_proj, NF4Linear) for m in modules.values())
    losses = [r["loss"] for r in read_metrics(tmp_path / "q" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 3 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert read_config(tmp_path / "q" / "adapter").placement == "pfeiffer"


def test_dpo_and_a_reward_run_train_bottleneck_adapters(tiny_model_dir, tmp_path):
    """DPO (its reference: the base with the adapters off) and a reward run (the head ``score`` saved
    beside the adapters, task_type SEQ_CLS) train with ``--peft bottleneck``; the reward folder
    loads back with its head, and resumes into a model that has one."""
    from engine.adapters.score_head import score_head
    from engine.config import TrainConfig
    from engine.recipes import dpo, reward
    from engine.recipes.dpo import DPOOptions
    from engine.run.metrics import read_metrics
    from models import load_model
    from tests.engine.recipes.pref_files import write_pref_subset

    data = write_pref_subset(tmp_path, 8, 2)

    def config(output: Path, **extra) -> TrainConfig:
        return TrainConfig(model=str(tiny_model_dir), data=str(data[0]), output=str(output), max_steps=3, batch_size=2,
                           lr=1e-2, warmup_steps=1, max_len=128, seed=3, eval_every=0, save_every=0,
                           peft="bottleneck", adapter_dim=4, **extra)

    dpo.train(config(tmp_path / "dpo"), progress=False, options=DPOOptions())
    records = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(records) == 3 and abs(records[0]["loss"] - math.log(2)) < 1e-6  # policy == reference at init
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] != records[0]["loss"]
    assert folder_method(tmp_path / "dpo" / "adapter").name == "bottleneck"

    run = reward.train(config(tmp_path / "reward", method="reward"), progress=False)
    folder = tmp_path / "reward" / "adapter"
    raw = json.loads((folder / CONFIG_NAME).read_text())
    assert raw["task_type"] == "SEQ_CLS" and raw["modules_to_save"] == ["score"]
    model = load_model(tiny_model_dir)
    load_adapter(model, folder)
    assert torch.equal(score_head(model).weight, score_head(run.model).weight.detach())
    with torch.no_grad():
        score_head(model).weight.zero_()
    load_adapter_weights(model, folder)
    assert torch.equal(score_head(model).weight, score_head(run.model).weight.detach())
    plain = load_model(tiny_model_dir)
    inject_adapter(plain, BottleneckConfig(adapter_dim=4))
    with pytest.raises(InputError, match="reward head"):
        load_adapter_weights(plain, folder)
