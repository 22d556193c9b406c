"""The DPO trainer: the reference policy is the same weights (adapter off, or the frozen initial
adapter), precomputed reference log-probs equal on-the-fly ones, resume is exact, DPO holds no
second model copy, and a short run on the SmolLM2 fixture learns held-out preferences."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.adapters import adapter_params
from engine.config import TrainConfig
from engine.data.preferences import PairBatchLoader, load_dpo_data
from engine.errors import InputError
from engine.losses.causal_lm import completion_logps
from engine.recipes import dpo, sft
from engine.recipes.dpo import REFERENCE_EXTRA, DPOOptions
from engine.recipes.dpo_reference import ReferencePolicy
from engine.run.metrics import read_metrics
from engine.run.session import Run
from models import load_model, load_tokenizer
from tests.lora_models import loaded_lora_model
from tests.engine.recipes.pref_files import write_pref_subset
from tests.tolerances import assert_close, tol

ROOT = Path(__file__).resolve().parents[3]
PREFS = ROOT / "examples" / "license_prefs.jsonl"
PREFS_EVAL = ROOT / "examples" / "license_prefs_eval.jsonl"


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> tuple[Path, Path]:
    return write_pref_subset(tmp_path_factory.mktemp("prefs"), 16, 4)


def dpo_config(model_dir: Path, data: tuple[Path, Path], output: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), data=str(data[0]), eval_data=str(data[1]), output=str(output),
                  max_steps=6, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, max_len=128, lora_r=4,
                  lora_alpha=8, lora_dropout=0.1, seed=3, eval_every=0, save_every=0)
    values.update(overrides)
    return TrainConfig(**values)


def run_dpo(cfg: TrainConfig, **options) -> Run:
    return dpo.train(cfg, progress=False, options=DPOOptions(**options))


def lines(output: Path, kind: str) -> list[dict]:
    """Metrics lines of one kind, without the wall-clock field tokens_per_s."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in read_metrics(output / "metrics.jsonl") if r["kind"] == kind]


def pair_batch(model_dir: Path, data: Path, n: int = 4):
    pairs = load_dpo_data(data, load_tokenizer(model_dir), max_len=128).train[:n]
    return PairBatchLoader(pairs, n, pad_id=2, shuffle=False).collate(list(range(n)))


def lora_model(model_dir: Path) -> torch.nn.Module:
    return loaded_lora_model(model_dir, std=0.2)


# ---------------------------------------------------------------------------- the reference policy

def test_reference_with_adapter_disabled_equals_the_base_model_exactly(tiny_model_dir, pref_data):
    batch = pair_batch(tiny_model_dir, pref_data[0])
    base_logps, lengths = completion_logps(load_model(tiny_model_dir), batch)
    model = lora_model(tiny_model_dir).train()
    ref_logps, ref_lengths = ReferencePolicy(model, frozen_initial=False).logps(batch)
    assert torch.equal(ref_logps, base_logps) and torch.equal(ref_lengths, lengths)
    assert model.training  # restored
    policy_logps, _ = completion_logps(model, batch)  # the adapter is on again, and it matters
    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)
    # summed over the completion only: lengths are the completion tokens of each row
    half = batch.input_ids.shape[0] // 2
    assert lengths[:half].tolist() == [(batch.labels[i, 1:] != -100).sum().item() for i in range(half)]


def test_frozen_initial_adapter_is_the_reference_and_training_weights_come_back(tiny_model_dir, pref_data):
    batch = pair_batch(tiny_model_dir, pref_data[0])
    model = lora_model(tiny_model_dir)
    start, _ = completion_logps(model, batch)
    reference = ReferencePolicy(model, frozen_initial=True)
    with torch.no_grad():  # "training" moves the adapter away from where it started
        for p in adapter_params(model).values():
            p.add_(0.05 * torch.randn_like(p))
    trained = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    moved, _ = completion_logps(model, batch)
    ref, _ = reference.logps(batch)
    assert torch.equal(ref, start) and not torch.allclose(moved, start, atol=1e-3)
    assert all(torch.equal(p, trained[n]) for n, p in adapter_params(model).items())


def test_padding_free_and_packed_dpo_equal_padded_dpo(tiny_model_dir, pref_data):
    """The same 4 pairs (2 batches of 2) padded, in one padding-free row per batch, or packed into
    rows of --max-len: equal reference and policy log-probs per completion, equal losses, metrics
    (RPO's NLL included) and LoRA gradients (fp32 table), and equal precomputed reference tables."""
    from engine.recipes.dpo import PreferenceObjective, batch_pairs, chosen_tokens, pair_losses
    from engine.recipes.dpo_reference import precompute_reference

    pairs = load_dpo_data(pref_data[0], load_tokenizer(tiny_model_dir), max_len=128).train[:4]
    model = lora_model(tiny_model_dir)
    reference = ReferencePolicy(model, frozen_initial=False)
    obj = PreferenceObjective(model, reference, DPOOptions(rpo_alpha=0.5), ref_tables={})

    def window_of(layout: str) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        window = list(PairBatchLoader(pairs, 2, pad_id=2, shuffle=False, batching=layout, max_len=128).batches(0))
        n_chosen = sum(chosen_tokens(b) for b in window)
        out: dict[str, list[torch.Tensor]] = {}
        for batch in window:
            losses, metrics, chosen = pair_losses(obj, batch, "train")
            (losses.sum() / 4 + 0.5 * -chosen.sum() / n_chosen).backward()
            for name, value in {"losses": losses.detach(), "ref": reference.logps(batch)[0], **metrics}.items():
                out.setdefault(name, []).append(value)
            out.setdefault("pairs", []).append(torch.tensor(batch_pairs(batch)))
        result = {name: torch.cat(values) for name, values in out.items()}
        result["n_chosen"] = torch.tensor(float(n_chosen))
        result.update({name: p.grad.clone() for name, p in adapter_params(model).items()})
        return result

    padded = window_of("padded")
    table = precompute_reference(reference, pairs, 4, 2, torch.device("cpu"), "", False)
    assert padded["rewards/chosen"].abs().max() > 1e-3  # the adapter matters: π ≠ π_ref
    for batching in ("padding-free", "pack"):
        other = window_of(batching)
        assert torch.equal(other["pairs"], padded["pairs"]) and other["n_chosen"] == padded["n_chosen"]
        # Log-probs are sums of ~30 token log-probs (~ -390 nats): they differ in the last bits, and
        # h = (π_c − ref_c) − (π_r − ref_r) cancels them, so what depends on h (losses, |dℓ/dh| <= β;
        # rewards) is held to that propagated error, <= 4 β drift; the log-probs to the table.
        drift = max((other[k] - padded[k]).abs().max().item() for k in ("logps/chosen", "logps/rejected", "ref"))
        through_h = ("losses", "rewards/chosen", "rewards/rejected", "rewards/margins")
        for name in padded:
            atol = 4 * 0.1 * drift + tol(torch.float32).atol if name in through_h else None
            assert_close(other[name], padded[name], torch.float32, name=f"{batching} {name}", atol=atol,
                         rtol=0.0 if atol else None)
        assert_close(precompute_reference(reference, pairs, 4, 2, torch.device("cpu"), "", False, batching=batching,
                                          max_len=128), table, torch.float32, name=f"{batching} reference table")


# ---------------------------------------------------------------------------- memory

def test_dpo_holds_no_second_model_copy(tiny_model_dir, pref_data, tmp_path):
    """Parameters + buffers of DPO's model take exactly the bytes of SFT's (same model and LoRA),
    and the run holds that one model only."""
    def model_bytes(model: torch.nn.Module) -> int:
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("\n".join((ROOT / "examples" / "license_qa.jsonl").read_text().splitlines()[:8]) + "\n")
    sft_run = sft.train(dpo_config(tiny_model_dir, (sft_data, None), tmp_path / "sft", eval_data=None, max_steps=1),
                        progress=False)
    for precompute in (False, True):
        dpo_run = run_dpo(dpo_config(tiny_model_dir, pref_data, tmp_path / f"dpo{precompute}", max_steps=1),
                          precompute_ref=precompute)
        assert model_bytes(dpo_run.model) == model_bytes(sft_run.model) > 0
        assert sum(1 for m in vars(dpo_run).values() if isinstance(m, torch.nn.Module)) == 1


# ---------------------------------------------------------------------------- resume and precompute

@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """An SFT adapter of the tiny model, the start of an SFT -> DPO chain."""
    out = tmp_path_factory.mktemp("sft-run")
    data = out / "qa.jsonl"
    data.write_text("\n".join((ROOT / "examples" / "license_qa.jsonl").read_text().splitlines()[:8]) + "\n")
    cfg = dpo_config(tiny_model_dir, (data, None), out / "run", eval_data=None, max_steps=3, grad_accum=1)
    sft.train(cfg, progress=False)
    return out / "run" / "adapter"


@pytest.mark.parametrize("precompute, chain", [(False, False), (True, False), (False, True)],
                         ids=["on-the-fly", "precomputed", "from-sft-adapter"])
def test_resume_mid_dpo_is_exact(tiny_model_dir, pref_data, sft_adapter, tmp_path, precompute, chain):
    init = dict(init_adapter=str(sft_adapter)) if chain else {}
    full_out, part = tmp_path / "full", tmp_path / "part"
    full = run_dpo(dpo_config(tiny_model_dir, pref_data, full_out, save_every=3, keep_checkpoints=5, **init),
                   precompute_ref=precompute)
    train_lines = lines(full_out, "train")
    losses = [r["loss"] for r in train_lines]
    assert len(losses) == 6
    for r in train_lines:  # 4 pairs per window (batch 2, accumulation 2): accuracy in quarters
        assert r["rewards/accuracies"] * 4 == round(r["rewards/accuracies"] * 4) and 0 <= r["rewards/accuracies"] <= 1
        assert abs(r["rewards/margins"] - (r["rewards/chosen"] - r["rewards/rejected"])) < 1e-6
        assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0
    assert any(r["rewards/margins"] != 0 for r in train_lines[1:])  # the policy moved off the reference
    step3 = full_out / "checkpoints" / "step-000003"
    assert (step3 / "reference_logps.safetensors").is_file() == precompute

    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, part / "checkpoints" / "step-000003")
    shutil.copy(full_out / "config.json", part / "config.json")
    kept = [r for r in read_metrics(full_out / "metrics.jsonl") if r["step"] <= 3]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    resumed = run_dpo(dpo_config(tiny_model_dir, pref_data, part, save_every=3, resume=True, **init),
                      precompute_ref=precompute)
    assert resumed.step == full.step == 6
    assert lines(part, "train") == lines(full_out, "train")  # bitwise: losses and every metric
    a = load_file(str(full_out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_reference_equals_on_the_fly(tiny_model_dir, pref_data, tmp_path):
    runs = {p: run_dpo(dpo_config(tiny_model_dir, pref_data, tmp_path / str(p), max_steps=2), precompute_ref=p)
            for p in (False, True)}
    table = runs[True].extras[REFERENCE_EXTRA]["train"]
    assert table.shape == (len(runs[True].data.train), 2)
    for kind in ("train", "eval"):
        a, b = lines(tmp_path / "False", kind), lines(tmp_path / "True", kind)
        for name in ("loss", "rewards/margins", "eval/rewards/margins", "rewards/chosen"):
            if name in a[0]:
                assert_close(torch.tensor([r[name] for r in b]), torch.tensor([r[name] for r in a]),
                             torch.float32, name=f"{kind} {name}")


def test_dpo_from_sft_adapter_starts_with_zero_rewards(tiny_model_dir, pref_data, sft_adapter, tmp_path):
    """π_ref is the starting policy (base + SFT adapter): at step 0 every implicit reward is exactly
    0, although the adapter does change the log-probs; the lineage names the parent."""
    run_dpo(dpo_config(tiny_model_dir, pref_data, tmp_path / "run", max_steps=1, init_adapter=str(sft_adapter)))
    first = lines(tmp_path / "run", "eval")[0]
    assert first["step"] == 0
    assert first["eval/rewards/chosen"] == first["eval/rewards/margins"] == first["eval/rewards/accuracies"] == 0
    from engine.adapters import read_adapter_metadata

    meta = read_adapter_metadata(tmp_path / "run" / "adapter")
    assert meta["method"] == "dpo" and meta["parent"]["method"] == "sft"
    assert meta["dpo"]["reference"] == "initial adapter (frozen)"


def test_bad_dpo_options_are_input_errors(tiny_model_dir, pref_data, tmp_path):
    with pytest.raises(InputError, match="DPO options: dpo beta must be positive"):
        run_dpo(dpo_config(tiny_model_dir, pref_data, tmp_path), beta=0)
    with pytest.raises(InputError, match="not preference data"):
        run_dpo(dpo_config(tiny_model_dir, (ROOT / "examples" / "license_qa.jsonl", None), tmp_path,
                           eval_data=None))
    assert not (tmp_path / "config.json").exists()


# ---------------------------------------------------------------------------- real weights

def test_dpo_on_smollm2_learns_held_out_preferences(smollm2_dir, tmp_path):
    """8 steps on the license pairs with LoRA on the attention of the last 8 of 30 blocks (so the
    backward stops there: CPU time). At step 0 π = π_ref (B = 0), so margins and accuracy are 0."""
    targets = ",".join(f"model.layers.{i}.self_attn.{p}" for i in range(22, 30) for p in ("q_proj", "v_proj"))
    cfg = TrainConfig(model=str(smollm2_dir), data=str(PREFS), eval_data=str(PREFS_EVAL), output=str(tmp_path / "run"),
                      max_steps=8, batch_size=4, lr=2e-3, warmup_steps=1, max_len=128, lora_r=8, lora_alpha=16,
                      lora_dropout=0.0, target_modules=targets, seed=0)
    run_dpo(cfg)
    evals = lines(tmp_path / "run", "eval")
    before, after = evals[0], evals[-1]
    assert before["eval/rewards/margins"] == 0 and before["eval/rewards/accuracies"] == 0
    assert after["eval/rewards/accuracies"] > 0.5, after
    assert after["eval/rewards/margins"] > before["eval/rewards/margins"], after
    assert after["loss"] < before["loss"]


def test_sft_then_dpo_chain_from_the_cli(tiny_model_dir, pref_data, tmp_path):
    """`engine.train` SFT, then `--method dpo --init-adapter` from its adapter; lineage links them."""
    import json
    import subprocess
    import sys

    from engine.adapters import read_adapter_metadata

    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("\n".join((ROOT / "examples" / "license_qa.jsonl").read_text().splitlines()[:8]) + "\n")
    common = ["--model", str(tiny_model_dir), "--max-steps", "2", "--batch-size", "2", "--max-len", "128"]
    sft = subprocess.run([sys.executable, "-m", "engine.train", *common, "--lora-r", "4", "--data", str(sft_data),
                          "--output", str(tmp_path / "sft")], cwd=ROOT, capture_output=True, text=True)
    assert sft.returncode == 0, sft.stderr
    dpo = subprocess.run([sys.executable, "-m", "engine.train", *common, "--method", "dpo", "--data",
                          str(pref_data[0]), "--eval-data", str(pref_data[1]), "--init-adapter",
                          str(tmp_path / "sft" / "adapter"), "--output", str(tmp_path / "dpo")],
                         cwd=ROOT, capture_output=True, text=True)
    assert dpo.returncode == 0, dpo.stderr
    assert "reward accuracy" in dpo.stderr
    record = read_adapter_metadata(tmp_path / "dpo" / "adapter")
    assert record["method"] == "dpo" and record["steps"] == 2
    assert record["parent_adapter"] == str((tmp_path / "sft" / "adapter").resolve())
    assert record["parent"]["method"] == "sft" and record["parent"]["data"][0]["path"] == str(sft_data.resolve())
    assert record["dpo"]["reference"] == "initial adapter (frozen)"
    first_eval = next(json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["kind"] == "eval")
    assert first_eval["eval/rewards/margins"] == 0.0  # step 0: the policy is its own reference


def test_rpo_adds_alpha_times_the_chosen_nll_per_token(tiny_model_dir, pref_data, tmp_path):
    """At step 1 both runs start from the same weights and see the same window, so the logged losses
    differ by exactly α · nll_loss, and nll_loss is the chosen answers' NLL per token."""
    runs = {alpha: run_dpo(dpo_config(tiny_model_dir, pref_data, tmp_path / f"a{alpha}", max_steps=1, lora_dropout=0.0),
                           rpo_alpha=alpha)
            for alpha in (0.0, 2.0)}
    plain, rpo = lines(tmp_path / "a0.0", "train")[0], lines(tmp_path / "a2.0", "train")[0]
    assert "nll_loss" not in plain and rpo["nll_loss"] > 0
    assert abs(rpo["loss"] - (plain["loss"] + 2.0 * rpo["nll_loss"])) < 1e-5 * rpo["loss"]
    # nll_loss = −Σ log p over the chosen completion tokens of the window / their number
    per_token = -rpo["logps/chosen_per_token"]  # a mean of per-pair ratios: close to, not equal to, the pooled mean
    assert abs(rpo["nll_loss"] - per_token) < 0.1 * per_token
    meta = runs[2.0].adapter_metadata()
    assert meta["dpo"]["rpo_alpha"] == 2.0


def test_step_zero_reports_no_reward_accuracy_and_eval_lines_carry_kl(tiny_model_dir, pref_data, tmp_path):
    from engine.recipes.dpo import summarize

    run_dpo(dpo_config(tiny_model_dir, pref_data, tmp_path / "run", max_steps=2))
    first, last = lines(tmp_path / "run", "eval")[0], lines(tmp_path / "run", "eval")[-1]
    assert first["eval/kl"] == 0.0 and last["eval/kl"] > 0  # policy = reference at step 0
    assert "reward accuracy n/a (policy = reference)" in summarize(first)
    assert "reward accuracy n/a" not in summarize(last)
