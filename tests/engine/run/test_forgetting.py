"""The retention set and the forgetting budget (issue 14), on the tiny SmolLM2-tokenizer model:
step 0 equals engine.eval's base numbers with KL exactly 0, the figures at the end equal a direct
computation on materialised logits, the budget stops or selects as documented, and a resume keeps
the cached base numbers and the chosen adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.adapters import disable_adapters, load_adapter
from engine.adapters.peft_format import lora_state_dict, read_adapter_metadata
from engine.config import TrainConfig
from engine.data.samples import load_samples
from engine.errors import InputError
from engine.eval import main as eval_main
from engine.recipes import dpo, sft
from engine.run.metrics import read_metrics
from models import load_model, load_tokenizer
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[3]
BUDGET = 0.025  # nats: the parrot run below passes it between its evaluations at steps 4 (+0.019) and 6 (+0.032)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Training text that makes the model a parrot (one phrase over and over: the general text's
    loss rises) and 8 lines of the example general text as the retention set."""
    out = tmp_path_factory.mktemp("forgetting")
    parrot = "".join(json.dumps({"text": "zebra zebra zebra quartz quartz " * 6}) + "\n" for _ in range(16))
    (out / "parrot.jsonl").write_text(parrot)
    lines = (ROOT / "examples" / "general_text.jsonl").read_text().splitlines()
    (out / "retain.jsonl").write_text("\n".join(lines[:8]) + "\n")
    return {"parrot": out / "parrot.jsonl", "retain": out / "retain.jsonl"}


def config(model_dir: Path, files: dict[str, Path], output: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), data=str(files["parrot"]), retain_data=str(files["retain"]),
                  output=str(output), max_steps=8, eval_every=2, lr=3e-2, max_len=64, lora_r=4, lora_alpha=8,
                  batch_size=4, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def evals(output: Path) -> list[dict]:
    return [r for r in read_metrics(output / "metrics.jsonl") if r["kind"] == "eval"]


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), (a, b)


def direct_retention(model_dir: Path, adapter: Path, retain: Path, max_len: int) -> tuple[float, float, float]:
    """(policy loss, base loss, KL(base ‖ policy)) per trainable token, from materialised fp32 logits."""
    model = load_model(model_dir)
    load_adapter(model, adapter)
    model.eval()
    samples, _ = load_samples(retain, load_tokenizer(model_dir), max_len=max_len)
    loss = base_loss = kl = 0.0
    n = 0
    with torch.no_grad():
        for s in samples:
            ids, labels = torch.tensor([s.input_ids]), torch.tensor(s.labels[1:])
            keep = labels != -100
            logp = F.log_softmax(model(ids)[0, :-1].double(), -1)[keep]
            with disable_adapters(model):
                logp0 = F.log_softmax(model(ids)[0, :-1].double(), -1)[keep]
            y = labels[keep]
            loss -= logp.gather(1, y[:, None]).sum().item()
            base_loss -= logp0.gather(1, y[:, None]).sum().item()
            kl += F.kl_div(logp, logp0, log_target=True, reduction="sum").item()
            n += int(keep.sum())
    return loss / n, base_loss / n, kl / n


def test_step_0_equals_engine_eval_and_the_end_equals_materialised_logits(tiny_model_dir, files, tmp_path):
    run = sft.train(config(tiny_model_dir, files, tmp_path / "run", max_steps=4, eval_every=0), progress=False)
    first, last = evals(tmp_path / "run")
    assert (first["step"], last["step"]) == (0, 4)
    # a fresh adapter (B = 0): the policy is the base, bit for bit
    assert first["retain/kl"] == 0.0 and first["retain/loss_delta"] == 0.0
    assert first["retain/loss"] == first["retain/base_loss"]
    # engine.eval's base row on the same file as general text
    assert eval_main(["--model", str(tiny_model_dir), "--data", str(files["parrot"]), "--general", str(files["retain"]),
                      "--max-len", "64", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    base_row = json.loads((tmp_path / "eval" / "eval.json").read_text())["rows"][0]
    assert base_row["name"] == "base" and base_row["general"]["tokens"] == first["retain/tokens"]
    assert_close(torch.tensor(first["retain/base_loss"]), torch.tensor(base_row["general"]["loss"]),
                 name="step-0 retention loss vs engine.eval's base general loss")
    # at the end: loss, base loss and KL against materialised logits
    loss, base_loss, kl = direct_retention(tiny_model_dir, tmp_path / "run" / "adapter", files["retain"], 64)
    assert last["retain/kl"] > 1e-3 and last["retain/loss_delta"] > 0  # it forgot: the test has teeth
    assert_close(torch.tensor([last["retain/loss"], last["retain/base_loss"], last["retain/kl"]]),
                 torch.tensor([loss, base_loss, kl], dtype=torch.float32), name="retain/loss, base_loss, kl")
    assert run.final_eval["retain/loss_delta"] == last["retain/loss_delta"]
    summary = json.loads((tmp_path / "run" / "run_complete.json").read_text())
    assert summary["forgetting"]["retain_data"] == str(files["retain"])


def test_budget_stop_ends_the_run_with_the_last_adapter_inside_it(tiny_model_dir, files, tmp_path):
    out = tmp_path / "stop"
    run = sft.train(config(tiny_model_dir, files, out, max_forgetting=BUDGET, save_every=2, keep_checkpoints=4),
                    progress=False)
    deltas = {r["step"]: r["retain/loss_delta"] for r in evals(out)}
    assert list(deltas) == [0, 2, 4, 6] and deltas[4] <= BUDGET < deltas[6]
    assert run.step == 6 and len([r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]) == 6
    assert_same_adapter(out / "adapter", out / "checkpoints" / "step-000004" / "adapter")
    assert read_adapter_metadata(out / "adapter")["steps"] == 4
    summary = json.loads((out / "run_complete.json").read_text())
    assert summary["forgetting"]["exceeded"]["step"] == 6 and summary["forgetting"]["adapter_step"] == 4
    assert not (out / "adapter-last").exists()
    assert "step 6" in run.forgetting.message() and "adapter of step 4" in run.forgetting.message()
    assert "adapter of step 4" in run.forgetting.adapter_note(run.step)


def test_budget_keep_best_trains_on_and_resume_keeps_the_choice_and_the_cached_base(tiny_model_dir, files, tmp_path):
    out = tmp_path / "best"
    cfg = dict(max_forgetting=BUDGET, on_budget="keep-best", save_every=2, keep_checkpoints=4)
    run = sft.train(config(tiny_model_dir, files, out, **cfg), progress=False)
    deltas = {r["step"]: r["retain/loss_delta"] for r in evals(out)}
    assert list(deltas) == [0, 2, 4, 6, 8] and deltas[4] <= BUDGET < deltas[6] < deltas[8]
    assert_same_adapter(out / "adapter", out / "checkpoints" / "step-000004" / "adapter")
    assert read_adapter_metadata(out / "adapter")["steps"] == 4
    assert read_adapter_metadata(out / "adapter-last")["steps"] == 8
    final = {k: v.cpu() for k, v in lora_state_dict(run.model).items()}
    last = adapter_tensors(out / "adapter-last")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)

    # Interrupted after the step-6 checkpoint, whose budget extra holds step 4's adapter; the
    # retention extra's cached base sum is replaced by a marker value, which the resumed run must
    # report rather than measure again.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-000006", part / "checkpoints" / "step-000006")
    shutil.copy(out / "config.json", part / "config.json")
    kept = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] <= 6]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    extra = part / "checkpoints" / "step-000006" / "retention.safetensors"
    saved = load_file(str(extra))
    tokens = int(saved["tokens"])
    save_file({"base_loss_sum": torch.tensor([1.5 * tokens], dtype=torch.float64), "tokens": saved["tokens"]},
              str(extra))
    sft.train(config(tiny_model_dir, files, part, resume=True, **cfg), progress=False)
    resumed = {r["step"]: r for r in evals(part)}
    assert resumed[8]["retain/base_loss"] == 1.5
    assert resumed[8]["retain/loss"] == {r["step"]: r for r in evals(out)}[8]["retain/loss"]
    assert_same_adapter(part / "adapter", out / "adapter")  # step 4's, restored from the checkpoint
    assert_same_adapter(part / "adapter-last", out / "adapter-last")


def test_retention_is_measured_for_dpo_too(tiny_model_dir, files, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    lines = (ROOT / "examples" / "license_prefs.jsonl").read_text().splitlines()[:8]
    prefs.write_text("\n".join(lines) + "\n")
    dpo.train(config(tiny_model_dir, files, tmp_path / "dpo", method="dpo", data=str(prefs), max_steps=2,
                     eval_every=0, max_len=128, lr=1e-2), progress=False)
    first, last = evals(tmp_path / "dpo")
    assert first["retain/kl"] == 0.0 and first["retain/loss_delta"] == 0.0
    assert last["step"] == 2 and last["retain/kl"] > 0


@pytest.mark.parametrize("overrides, message", [
    (dict(max_forgetting=0.1, retain_data=None), "--max-forgetting is measured on --retain-data"),
    (dict(on_budget="keep-best"), "--on-budget keep-best applies with --max-forgetting"),
    (dict(method="dpo", kl_to_base=0.1), "--kl-to-base applies to --method sft"),
    (dict(method="dpo", replay_data="x.jsonl"), "--replay-data applies to --method sft"),
    (dict(replay_data="x.jsonl", pack=True), "does not apply to packed rows"),
])
def test_flags_that_do_not_go_together_are_refused(tiny_model_dir, files, tmp_path, overrides, message):
    with pytest.raises(InputError, match=message):
        config(tiny_model_dir, files, tmp_path / "bad", **overrides).validate()
    assert not (tmp_path / "bad").exists()


def test_replay_and_kl_anchor_resume_exactly_and_mix_the_exact_fraction(tiny_model_dir, files, tmp_path):
    cfg = dict(replay_data=str(files["retain"]), replay_ratio=0.2, kl_to_base=0.5, max_steps=6, eval_every=3,
               save_every=3, keep_checkpoints=3, lora_dropout=0.1)
    full = tmp_path / "full"
    sft.train(config(tiny_model_dir, files, full, **cfg), progress=False)
    lines = [r for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "train"]
    # 4 training samples per step, replay / (train + replay) = 0.2: 1 replay sample per step
    assert [r["replay/samples"] for r in lines] == [1] * 6
    assert lines[0]["kl_to_base"] == 0.0 and all(r["kl_to_base"] > 0 for r in lines[1:])
    for r in lines:  # objective = (train + replay + β kl) / N over the N tokens of both
        train_tokens = r["tokens"] - r["replay/tokens"]
        total = (r["loss"] * train_tokens + r["replay/loss"] * r["replay/tokens"]) / r["tokens"] + 0.5 * r["kl_to_base"]
        assert_close(torch.tensor(r["objective"]), torch.tensor(total), name=f"objective of step {r['step']}")

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000003", part / "checkpoints" / "step-000003")
    shutil.copy(full / "config.json", part / "config.json")
    kept = [r for r in read_metrics(full / "metrics.jsonl") if r["step"] <= 3 and r["kind"] != "summary"]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    sft.train(config(tiny_model_dir, files, part, resume=True, **cfg), progress=False)

    def figures(folder: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(folder / "metrics.jsonl")
                if r["kind"] in ("train", "eval")]
    assert figures(part) == figures(full)  # the same replay samples, dropout draws and KL, bit for bit
    assert_same_adapter(part / "adapter", full / "adapter")
