"""Prefix tuning (``--peft prefix``) against HF PEFT 0.21 on transformers' Llama (GQA 4/2) as the
oracle: PEFT's initialisation, our folder loaded by PEFT and PEFT's loaded by us with the same
logits (fp32, LOGITS_FP32_ATOL), with and without the projection MLP, padded batches; then our
model alone: a packed row equals its documents alone (hidden states and every prefix gradient),
KV-cache generation equals the full forward, checkpointing, adapters off = the base, resume,
bad folders refused before the model changes, merge refused."""

import json
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.adapters import (
    NotMergeable,
    adapter_params,
    disable_adapters,
    inject_adapter,
    load_adapter,
    load_adapter_weights,
    merge,
    read_adapter_metadata,
    read_config,
    remove_adapters,
    save_adapter,
    set_trainable,
)
from engine.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from engine.adapters.prefix import PrefixConfig, PrefixEncoder, PrefixShape, prefix_encoder
from engine.adapters.prefix_method import PROJECTION_NAME
from engine.errors import InputError
from models.attention import DocumentLayout
from models.loading import load_model
from tests.engine.adapters.hf_reference import hf_model
from tests.tolerances import LOGITS_FP32_ATOL, assert_close

P = 5
CONFIGS = {"plain": PrefixConfig(P), "projection": PrefixConfig(P, prefix_projection=True),
           "projection-E24": PrefixConfig(P, prefix_projection=True, encoder_hidden_size=24)}


def ids(B=2, T=9, seed=7):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded():
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    return mask, (mask.cumsum(-1) - 1).clamp(min=0)


def prefixed(hf_dir, cfg, seed=3):
    model = load_model(hf_dir)
    torch.manual_seed(seed)
    inject_adapter(model, cfg)
    return model.eval()


def peft_config(cfg: PrefixConfig, **kw):
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                                   prefix_projection=cfg.prefix_projection,
                                   encoder_hidden_size=cfg.encoder_hidden_size, **kw)


# ---------------------------------------------------------------------------- PEFT as the oracle

@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_initialisation_and_sizes_are_peft(hf_dir, cfg):
    """Same seed, same weights, names and shapes as PEFT's PrefixEncoder built from the config
    PEFT derives for this model (GQA: token_dim = nkv·hd, num_attention_heads = nkv)."""
    from peft.tuners.prefix_tuning import PrefixEncoder as PeftPrefixEncoder

    derived = peft.get_peft_model(hf_model(hf_dir), peft_config(cfg)).peft_config["default"]
    model = load_model(hf_dir)
    shape = PrefixShape.of(model)
    assert (shape.token_dim, shape.num_kv_heads, shape.num_layers) == (32, 2, 2)
    assert (derived.token_dim, derived.num_attention_heads, derived.num_layers) == (32, 2, 2)
    torch.manual_seed(11)
    theirs = PeftPrefixEncoder(derived)
    torch.manual_seed(11)
    ours = PrefixEncoder(shape, cfg)
    want = dict(theirs.named_parameters())
    assert list(dict(ours.named_parameters())) == list(want)
    for name, param in ours.named_parameters():
        assert param.dtype == torch.float32
        assert torch.equal(param, want[name]), name


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_our_folder_on_peft_gives_our_logits(hf_dir, tmp_path, cfg):
    model = prefixed(hf_dir, cfg)
    save_adapter(model, cfg, tmp_path / "ad", str(hf_dir), metadata={"run": "t"})
    mask, pos = left_padded()
    with torch.no_grad():
        ours, ours_pad = model(ids()), model(ids(), attention_mask=mask)
        pm = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "ad").eval()
        theirs = pm(ids()).logits
        theirs_pad = pm(ids(), attention_mask=mask, position_ids=pos).logits  # PEFT adds P to them
        base = hf_model(hf_dir)(ids()).logits
    assert (theirs - base).abs().max() > 1e-1  # the prefix really changes the output
    assert_close(ours, theirs, torch.float32, "logits", atol=LOGITS_FP32_ATOL)
    real = mask.bool()
    assert_close(ours_pad[real], theirs_pad[real], torch.float32, "left-padded logits", atol=LOGITS_FP32_ATOL)
    assert read_adapter_metadata(tmp_path / "ad") == {"run": "t"}
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == sorted([CONFIG_NAME, WEIGHTS_NAME] + ([PROJECTION_NAME] if cfg.prefix_projection else []))
    # PEFT's loaded config: the fold is a plain prefix
    loaded = pm.peft_config["default"]
    assert not loaded.prefix_projection and loaded.token_dim == 32 and loaded.num_attention_heads == 2
    assert list(load_file(tmp_path / "ad" / WEIGHTS_NAME)) == ["prompt_embeddings"]


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_config_and_tensor_are_what_peft_writes(hf_dir, tmp_path, cfg):
    """PEFT trains with our weights (its projection MLP runs) and saves: the same config fields
    (prefix_projection folded to false; PEFT's peft_version aside) and the same prompt_embeddings."""
    model = prefixed(hf_dir, cfg)
    save_adapter(model, cfg, tmp_path / "ours", str(hf_dir))
    pm = peft.get_peft_model(hf_model(hf_dir), peft_config(cfg, base_model_name_or_path=str(hf_dir)))
    with torch.no_grad():
        for name, param in pm.prompt_encoder.default.named_parameters():
            param.copy_(dict(prefix_encoder(model).named_parameters())[name])
        assert_close(pm.eval()(ids()).logits, model(ids()), torch.float32, "PEFT training-mode logits",
                     atol=LOGITS_FP32_ATOL)
    pm.save_pretrained(tmp_path / "peft")
    theirs = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    ours = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    theirs.pop("peft_version")
    theirs["prefix_projection"] = False  # ours is folded: that is the one field we write differently
    assert ours == theirs
    assert_close(load_file(tmp_path / "ours" / WEIGHTS_NAME)["prompt_embeddings"],
                 load_file(tmp_path / "peft" / WEIGHTS_NAME)["prompt_embeddings"], torch.float32, "prompt_embeddings")


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
def test_peft_folder_loaded_by_us_gives_peft_logits(hf_dir, tmp_path, projection):
    """A folder PEFT made (a projected one holds only the fold: we read it as a plain prefix, as
    PEFT itself does for inference)."""
    torch.manual_seed(5)
    pm = peft.get_peft_model(hf_model(hf_dir), peft_config(PrefixConfig(4, projection)))
    pm.save_pretrained(tmp_path / "peft")
    model = load_model(hf_dir)
    cfg = load_adapter(model, tmp_path / "peft")
    assert cfg == PrefixConfig(4) and read_config(tmp_path / "peft") == PrefixConfig(4)
    mask, pos = left_padded()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "peft").eval()
        assert_close(model(ids()), theirs(ids()).logits, torch.float32, "logits", atol=LOGITS_FP32_ATOL)
        real = mask.bool()
        assert_close(model(ids(), attention_mask=mask)[real],
                     theirs(ids(), attention_mask=mask, position_ids=pos).logits[real], torch.float32,
                     "left-padded logits", atol=LOGITS_FP32_ATOL)


# ---------------------------------------------------------------------------- our model alone

def test_packed_row_equals_each_document_alone(hf_dir):
    """Two documents in one row (and a host-built layout): each sees the prefix as if alone, and the
    prefix's gradients are the sum of the two documents' (fp32 table)."""
    model = prefixed(hf_dir, CONFIGS["projection"])
    set_trainable(model)
    lengths = [6, 11]
    row = ids(1, sum(lengths), seed=9)
    weight = torch.randn(1, sum(lengths), 64, generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    segments = torch.repeat_interleave(torch.arange(2), torch.tensor(lengths))[None]

    def run(x, w, **inputs):
        model.zero_grad()
        h = model.hidden_states(x, **inputs)
        (h * w).sum().backward()
        return h.detach(), {n: p.grad.clone() for n, p in adapter_params(model).items()}

    for segment_ids in (segments, DocumentLayout.from_lengths([lengths])):
        packed, grads = run(row, weight, position_ids=positions, segment_ids=segment_ids)
        a, ga = run(row[:, :6], weight[:, :6])
        b, gb = run(row[:, 6:], weight[:, 6:])
        assert_close(packed, torch.cat((a, b), dim=1), torch.float32, "packed hidden states")
        for name in grads:
            assert grads[name].abs().max() > 0
            assert_close(grads[name], ga[name] + gb[name], torch.float32, f"grad {name}")


def test_gradient_checkpointing_gives_the_same_gradients(hf_dir):
    model = prefixed(hf_dir, CONFIGS["plain"]).train()
    set_trainable(model)
    mask, _ = left_padded()

    def grads():
        model.zero_grad()
        model.hidden_states(ids(), attention_mask=mask)[mask.bool()].square().sum().backward()
        return {n: p.grad.clone() for n, p in adapter_params(model).items()}

    plain = grads()
    model.gradient_checkpointing = True
    for name, g in grads().items():
        assert_close(g, plain[name], torch.float32, name)
    model.offload_activations = True
    with pytest.raises(ValueError, match="offload_activations"):
        grads()


@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded-batch"])
def test_kv_cache_generation_equals_the_full_forward(hf_dir, padded):
    """Greedy decoding with the cache (the prefix in it before the prompt): every step's logits
    equal the full forward over prompt + tokens so far."""
    model = prefixed(hf_dir, CONFIGS["projection"])
    prompt = ids(2, 7, seed=3)
    mask = torch.ones_like(prompt)
    if padded:
        mask[0, :2] = 0
    steps = 5
    with torch.no_grad():
        cache = model.new_cache(batch_size=2, max_len=prompt.shape[1] + steps)
        assert cache.length == 0 and cache.max_len == P + prompt.shape[1] + steps
        logits = model(prompt, attention_mask=mask, cache=cache)[:, -1]
        assert cache.prefix_length == P and cache.length == P + prompt.shape[1]
        seq, full_mask = prompt, mask
        for _ in range(steps):
            want = model(seq, attention_mask=full_mask)[:, -1]
            assert_close(logits, want, torch.float32, "cached logits", atol=LOGITS_FP32_ATOL)
            token = want.argmax(-1, keepdim=True)
            seq, full_mask = torch.cat((seq, token), 1), torch.cat((full_mask, torch.ones_like(token)), 1)
            logits = model(token, cache=cache)[:, -1]
        assert cache.length == P + prompt.shape[1] + steps - 1 + 1


def test_generate_and_sample_completions_use_the_prefix(hf_dir):
    """engine.generate and engine.sampling (left-padded batch) run through new_cache: greedy tokens
    equal the argmax of full forwards, and differ from the base's."""
    from engine.generate import generate
    from engine.sampling import sample_completions

    model = prefixed(hf_dir, CONFIGS["plain"])
    with torch.no_grad():
        prefix_encoder(model).embedding.weight.mul_(4)  # a strong prefix: greedy tokens change
    prompts = [ids(1, 6, seed=4)[0].tolist(), ids(1, 3, seed=5)[0].tolist()]

    def greedy_by_full_forwards(prompt, n):
        seq, out = torch.tensor([prompt]), []
        with torch.no_grad():
            for _ in range(n):
                out.append(int(model(seq)[0, -1].argmax()))
                seq = torch.cat((seq, torch.tensor([[out[-1]]])), 1)
        return out

    want = [greedy_by_full_forwards(p, 6) for p in prompts]
    assert list(generate(model, prompts[0], max_new_tokens=6)) == want[0]
    assert sample_completions(model, prompts, max_new_tokens=6, temperature=0.0, top_p=1.0, eos_token_ids=(),
                              generator=None, pad_id=0) == want
    with disable_adapters(model):
        assert [list(generate(model, p, max_new_tokens=6)) for p in prompts] != want


def test_adapter_off_is_the_base_and_removal_restores_it(hf_dir):
    model = prefixed(hf_dir, CONFIGS["projection"])
    base = load_model(hf_dir).eval()
    mask, _ = left_padded()
    with torch.no_grad():
        want = base(ids(), attention_mask=mask)
        assert (model(ids(), attention_mask=mask) - want).abs().max() > 1e-1
        with disable_adapters(model):
            assert torch.equal(model(ids(), attention_mask=mask), want)
            cache = model.new_cache(2, 4)
            model(ids(2, 3), cache=cache)
            assert cache.prefix_length == 0 and cache.length == 3
        remove_adapters(model)
        assert prefix_encoder(model) is None and not adapter_params(model)
        assert torch.equal(model(ids(), attention_mask=mask), want)


def test_trainable_parameters_are_the_prefix_only(hf_dir):
    model = prefixed(hf_dir, CONFIGS["projection"])
    n = set_trainable(model)
    names = sorted(adapter_params(model))
    assert names == sorted(f"model.prefix_encoder.{k}" for k in (
        "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"))
    assert n == 5 * 32 + 32 * 32 + 32 + 128 * 32 + 128
    assert all(p.requires_grad == (name in names) for name, p in model.named_parameters())


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_resume_restores_the_training_tensors_exactly(hf_dir, tmp_path, cfg):
    model = prefixed(hf_dir, cfg, seed=3)
    save_adapter(model, cfg, tmp_path / "ad", str(hf_dir))
    width = cfg.encoder_hidden_size or 32 if cfg.prefix_projection else None  # read back explicit
    assert read_config(tmp_path / "ad") == PrefixConfig(P, cfg.prefix_projection, width)
    other = prefixed(hf_dir, cfg, seed=4)
    load_adapter_weights(other, tmp_path / "ad")
    for (name, p), q in zip(prefix_encoder(model).named_parameters(), prefix_encoder(other).parameters()):
        assert torch.equal(p, q), name
    fresh = load_model(hf_dir)
    assert load_adapter(fresh, tmp_path / "ad") == PrefixConfig(P, cfg.prefix_projection, width)
    for p, q in zip(prefix_encoder(model).parameters(), prefix_encoder(fresh).parameters()):
        assert torch.equal(p, q)
    wrong = prefixed(hf_dir, PrefixConfig(P + 1, cfg.prefix_projection))
    with pytest.raises(InputError, match="num_virtual_tokens"):
        load_adapter_weights(wrong, tmp_path / "ad")


def _break(folder, what):
    if what == "shape":
        save_file({"prompt_embeddings": torch.zeros(P, 64)}, folder / WEIGHTS_NAME)
    elif what == "extra-key":
        t = load_file(folder / WEIGHTS_NAME)
        save_file({**t, "other": torch.zeros(1)}, folder / WEIGHTS_NAME)
    elif what == "nan":
        t = load_file(folder / WEIGHTS_NAME)
        t["prompt_embeddings"][0, 0] = float("nan")
        save_file(t, folder / WEIGHTS_NAME)
    elif what in ("num_layers", "token_dim", "num_transformer_submodules"):
        raw = json.loads((folder / CONFIG_NAME).read_text())
        raw[what] = 3 if what == "num_layers" else (48 if what == "token_dim" else 2)
        (folder / CONFIG_NAME).write_text(json.dumps(raw))
    elif what == "fold-mismatch":
        t = load_file(folder / PROJECTION_NAME)
        t["transform.2.bias"] += 1.0
        save_file(t, folder / PROJECTION_NAME)
    elif what == "projection-missing-key":
        t = load_file(folder / PROJECTION_NAME)
        del t["transform.0.bias"]
        save_file(t, folder / PROJECTION_NAME)


@pytest.mark.parametrize("what,file,message", [
    ("shape", WEIGHTS_NAME, r"prompt_embeddings has shape \(5, 64\), expected \(5, 128\)"),
    ("extra-key", WEIGHTS_NAME, "expected exactly"),
    ("nan", WEIGHTS_NAME, "non-finite"),
    ("num_layers", CONFIG_NAME, "num_layers=3"),
    ("token_dim", CONFIG_NAME, "token_dim=48"),
    ("num_transformer_submodules", CONFIG_NAME, "num_transformer_submodules=2"),
    ("fold-mismatch", PROJECTION_NAME, "fold differs"),
    ("projection-missing-key", PROJECTION_NAME, "expected exactly"),
])
def test_bad_folders_raise_input_error_and_leave_the_model_untouched(hf_dir, tmp_path, what, file, message):
    cfg = CONFIGS["projection"]
    save_adapter(prefixed(hf_dir, cfg), cfg, tmp_path / "ad", str(hf_dir))
    _break(tmp_path / "ad", what)
    model = load_model(hf_dir)
    with pytest.raises(InputError, match=message) as err:
        load_adapter(model, tmp_path / "ad")
    assert file in str(err.value)
    assert prefix_encoder(model) is None
    injected = prefixed(hf_dir, cfg)
    before = {n: p.clone() for n, p in adapter_params(injected).items()}
    with pytest.raises(InputError, match=message):
        load_adapter_weights(injected, tmp_path / "ad")
    assert all(torch.equal(p, before[n]) for n, p in adapter_params(injected).items())


def test_merge_is_refused(hf_dir, tmp_path):
    cfg = CONFIGS["plain"]
    model = prefixed(hf_dir, cfg)
    with pytest.raises(NotMergeable, match="cannot be merged"):
        merge(model)
    assert prefix_encoder(model) is not None  # nothing changed
    save_adapter(model, cfg, tmp_path / "ad", str(hf_dir))
    done = subprocess.run([sys.executable, "-m", "engine.merge", "--model", str(hf_dir), "--adapter",
                           str(tmp_path / "ad"), "--out", str(tmp_path / "merged")], capture_output=True, text=True)
    assert done.returncode != 0
    assert "not mergeable" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------- training through the dispatch

def test_sft_with_prefix_on_smollm2_lowers_held_out_loss(smollm2_dir, tmp_path):
    """``--peft prefix`` through the SFT recipe (no method branch): 8 steps on the real model and
    real Q&A. PEFT's N(0, 1) initial prefix hurts the model at first (held-out 6.42 against the
    base's 3.53, measured); 8 steps bring it well below that start (3.80, measured; not yet below
    the base's, which is printed, not asserted); the folder is PEFT's."""
    from engine.config import TrainConfig
    from engine.losses.causal_lm import mean_loss
    from engine.recipes import sft
    from engine.run.metrics import read_metrics
    from tests.engine.recipes.test_sft import ROOT

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join((ROOT / "examples" / "license_qa_eval.jsonl").read_text().splitlines(True)[:12]))
    cfg = TrainConfig(model=str(smollm2_dir), data=str(ROOT / "examples" / "license_qa.jsonl"),
                      eval_data=str(eval_file), output=str(tmp_path / "run"), max_steps=8, batch_size=4,
                      lr=3e-2, warmup_steps=1, max_len=256, peft="prefix", num_virtual_tokens=10, seed=0)
    run = sft.train(cfg, progress=False)
    evals = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    with disable_adapters(run.model):
        base = mean_loss(run.model, run.data.eval, batch_size=4, pad_id=run.tokenizer.pad_token_id,
                         device=run.device, progress=False, batching="padding-free").to_json()["loss"]
    print(f"held-out loss: start {evals[0]:.4f}, after 8 steps {evals[-1]:.4f}, base model {base:.4f}")
    assert evals[-1] < 0.8 * evals[0], evals
    assert read_config(tmp_path / "run" / "adapter") == PrefixConfig(10)
    assert sorted(p.name for p in (tmp_path / "run" / "adapter").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_dpo_with_prefix_reference_is_the_base_and_run_finishes(tiny_model_dir, tmp_path):
    """DPO's reference policy (every adapter off) with a prefix is the base model exactly; a short
    ``--peft prefix`` DPO run finishes with finite losses and writes the prefix folder."""
    from engine.losses.causal_lm import completion_logps
    from engine.recipes.dpo_reference import ReferencePolicy
    from tests.engine.recipes.pref_files import write_pref_subset
    from tests.engine.recipes.test_dpo import dpo_config, lines, pair_batch, run_dpo

    (tmp_path / "prefs").mkdir()
    data = write_pref_subset(tmp_path / "prefs", 8, 2)
    batch = pair_batch(tiny_model_dir, data[0])
    base_logps, _ = completion_logps(load_model(tiny_model_dir), batch)
    model = load_model(tiny_model_dir)
    torch.manual_seed(0)
    inject_adapter(model, PrefixConfig(6))
    ref_logps, _ = ReferencePolicy(model.train(), frozen_initial=False).logps(batch)
    assert torch.equal(ref_logps, base_logps)
    policy_logps, _ = completion_logps(model, batch)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)
    run_dpo(dpo_config(tiny_model_dir, data, tmp_path / "run", peft="prefix", num_virtual_tokens=6, max_steps=3))
    losses = [r["loss"] for r in lines(tmp_path / "run", "train")]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert read_config(tmp_path / "run" / "adapter") == PrefixConfig(6)


def test_prefix_on_an_nf4_base_trains_and_is_off_exactly(tiny_model_dir):
    """--quant nf4: the prefix combines with NF4Linear bases (gradients reach the prefix only)."""
    from models.quantized import NF4Linear

    model = load_model(tiny_model_dir, quantize="nf4")
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    with torch.no_grad():
        base = model(ids(2, 7))
    torch.manual_seed(0)
    inject_adapter(model, PrefixConfig(4, prefix_projection=True))
    set_trainable(model)
    model.hidden_states(ids(2, 7)).square().sum().backward()
    grads = {n: p.grad for n, p in adapter_params(model).items()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads.values())
    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(model(ids(2, 7)), base)
