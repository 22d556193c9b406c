"""The reward model (``--method reward``): its run's metrics and PEFT sequence-classification folder,
PEFT's scores equal ours, resume is exact, ``--init-adapter`` chains, the scorer renders as training
did, ``engine.eval --reward-model`` reproduces the run's final eval, and a short run on the SmolLM2
fixture beats the untrained head on the held-out license pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from engine.adapters import LoRAConfig, inject_lora, read_adapter_metadata, save_adapter
from engine.config import TrainConfig
from engine.data.preferences import load_preference_pairs
from engine.errors import EXIT_INPUT_ERROR, InputError, run_cli
from engine.eval import main as eval_main
from engine.recipes import dpo, reward
from engine.reward_model import RewardModelScorer
from engine.run.metrics import read_metrics
from models import load_model, load_tokenizer
from tests.engine.recipes.pref_files import write_pref_subset
from tests.tolerances import LOGITS_FP32_ATOL, assert_close

ROOT = Path(__file__).resolve().parents[3]
PREFS = ROOT / "examples" / "license_prefs.jsonl"
PREFS_EVAL = ROOT / "examples" / "license_prefs_eval.jsonl"


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> tuple[Path, Path]:
    return write_pref_subset(tmp_path_factory.mktemp("prefs"), 16, 6)


def reward_config(model_dir: Path, data: tuple[Path, Path], output: Path, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), data=str(data[0]), eval_data=str(data[1]), output=str(output),
                  method="reward", max_steps=6, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, max_len=128,
                  lora_r=4, lora_alpha=8, lora_dropout=0.1, seed=3, eval_every=0, save_every=3, keep_checkpoints=5)
    values.update(overrides)
    return TrainConfig(**values)


def lines(output: Path, kind: str) -> list[dict]:
    """Metrics lines of one kind, without the wall-clock field tokens_per_s."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in read_metrics(output / "metrics.jsonl") if r["kind"] == kind]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, pref_data, tmp_path_factory) -> Path:
    """A 6-step reward run of the tiny model (checkpoints at steps 3 and 6); its output folder."""
    out = tmp_path_factory.mktemp("reward") / "run"
    reward.train(reward_config(tiny_model_dir, pref_data, out), progress=False)
    return out


def causal_lm_adapter(model_dir: Path, out: Path) -> Path:
    """A plain LoRA adapter (no head) of the tiny model."""
    model = load_model(model_dir)
    torch.manual_seed(0)
    inject_lora(model, cfg := LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    return save_adapter(model, cfg, out, str(model_dir))


# ---------------------------------------------------------------------------- the run and its folder

def test_reward_run_logs_accuracy_and_margin_and_writes_a_seq_cls_adapter(trained):
    train_lines, evals = lines(trained, "train"), lines(trained, "eval")
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [0, 6]
    for r in train_lines:  # 4 pairs per window (batch 2, accumulation 2): accuracy in quarters
        assert r["accuracy"] * 4 == round(r["accuracy"] * 4) and 0 <= r["accuracy"] <= 1
        assert r["loss"] > 0 and "margin" in r
    for r in evals:
        assert r["pairs"] == 6 and r["eval/accuracy"] * 6 == round(r["eval/accuracy"] * 6)
    assert evals[-1]["eval/margin"] != evals[0]["eval/margin"]  # the head and LoRA moved
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    tensors = load_file(str(trained / "adapter" / "adapter_model.safetensors"))
    head = tensors.pop("base_model.model.score.weight")
    assert head.shape == (1, 32) and head.dtype == torch.float32
    assert tensors and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    record = read_adapter_metadata(trained / "adapter")
    assert record["method"] == "reward" and record["reward"]["max_len"] == 128
    assert record["reward"]["pairs_with_margin"] == 0
    assert json.loads((trained / "run_complete.json").read_text())["eval"]["eval/accuracy"] == evals[-1]["eval/accuracy"]


def test_peft_loads_the_reward_model_as_sequence_classification_with_our_scores(trained, tiny_model_dir, pref_data):
    """transformers' AutoModelForSequenceClassification (num_labels=1) + PeftModel.from_pretrained on
    our folder: the same score per sequence (fp32, <= 1e-4). HF pools at the last token that is not
    config.pad_token_id; SmolLM2's pad id is its EOS / end-of-turn token, which ends every sequence,
    so with it HF would score the token before. Each sequence is scored alone (batch 1) with
    pad_token_id None, which HF then pools at position -1: the last token, as ours."""
    tokenizer = load_tokenizer(tiny_model_dir)
    pairs, _ = load_preference_pairs(pref_data[1], tokenizer, max_len=128)
    sequences = [p.prompt + side for p in pairs[:3] for side in (p.chosen, p.rejected)]
    ours = RewardModelScorer.load(trained / "adapter", device="cpu", dtype="fp32").score_sequences(sequences)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1,
                                                                         dtype=torch.float32)
    hf.config.pad_token_id = None
    random_head = hf.score.weight.detach().clone()
    model = peft.PeftModel.from_pretrained(hf, trained / "adapter").eval()
    with torch.no_grad():
        theirs = torch.stack([model(torch.tensor([seq])).logits[0, 0] for seq in sequences])
    assert not torch.equal(model.base_model.model.score.modules_to_save["default"].weight, random_head)
    assert_close(torch.tensor(ours), theirs, torch.float32, "PEFT scores vs ours", atol=LOGITS_FP32_ATOL, rtol=0)
    assert torch.tensor(ours).std() > 1e-3  # scores that differ, so the comparison means something


def test_resume_mid_reward_run_is_exact(trained, tiny_model_dir, pref_data, tmp_path):
    part = tmp_path / "part"
    step3 = trained / "checkpoints" / "step-000003"
    assert "score.weight.exp_avg" in load_file(str(step3 / "optimizer.safetensors"))  # the head's AdamW state
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(step3, part / "checkpoints" / "step-000003")
    shutil.copy(trained / "config.json", part / "config.json")
    kept = [r for r in read_metrics(trained / "metrics.jsonl") if r["step"] <= 3]
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    resumed = reward.train(reward_config(tiny_model_dir, pref_data, part, resume=True), progress=False)
    assert resumed.step == 6
    assert lines(part, "train") == lines(trained, "train")  # bitwise: losses, accuracy, margin
    assert lines(part, "eval")[-1] == lines(trained, "eval")[-1]
    a = load_file(str(trained / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_adapter_restores_the_head_or_starts_one_and_dpo_refuses_a_reward_model(trained, tiny_model_dir,
                                                                                      pref_data, tmp_path):
    """From a reward model its head comes back (step 0 of the child = the parent's final eval);
    from a causal-LM adapter a fresh head starts; DPO and SFT do not start from a reward model."""
    child = tmp_path / "child"
    reward.train(reward_config(tiny_model_dir, pref_data, child, max_steps=1, save_every=0,
                               init_adapter=str(trained / "adapter")), progress=False)
    assert lines(child, "eval")[0] | {"step": 6} == lines(trained, "eval")[-1]
    assert read_adapter_metadata(child / "adapter")["parent"]["method"] == "reward"
    plain = causal_lm_adapter(tiny_model_dir, tmp_path / "plain")
    from_plain = reward.train(reward_config(tiny_model_dir, pref_data, tmp_path / "from-plain", max_steps=1,
                                            save_every=0, init_adapter=str(plain)), progress=False)
    assert from_plain.model.score.weight.shape == (1, 32)
    with pytest.raises(InputError, match="a reward model .*--method dpo starts from a causal-LM adapter"):
        dpo.train(reward_config(tiny_model_dir, pref_data, tmp_path / "dpo", method="dpo",
                                init_adapter=str(trained / "adapter")), progress=False)
    assert not (tmp_path / "dpo").exists()


# ---------------------------------------------------------------------------- scoring and evaluation

def test_scorer_renders_prompt_and_completion_as_training_did(trained, tiny_model_dir, pref_data, tmp_path):
    scorer = RewardModelScorer.load(trained / "adapter", device="cpu")
    assert scorer.__name__ == "reward_model" and scorer.max_len == 128  # the run's, from the lineage
    record = json.loads(pref_data[1].read_text().splitlines()[0])
    pair = load_preference_pairs(pref_data[1], scorer.tokenizer, max_len=128)[0][0]
    # chat: the record's messages, as TRL passes them (and a string completion after a chat prompt)
    assert scorer.render(record["prompt"], record["chosen"]) == pair.prompt + pair.chosen
    assert scorer.render(record["prompt"], record["rejected"][0]["content"]) == pair.prompt + pair.rejected
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"prompt": "Who is the Licensor?", "chosen": " The owner.", "rejected": " Nobody."}))
    text_pair = load_preference_pairs(text, scorer.tokenizer)[0][0]
    assert scorer.render("Who is the Licensor?", " The owner.") == text_pair.prompt + text_pair.chosen
    chosen, rejected = scorer.score_pairs([pair])
    called = scorer([record["prompt"]] * 2, [record["chosen"], record["rejected"]], answer=["ignored"] * 2)
    assert_close(torch.tensor(called), torch.cat([chosen, rejected]), torch.float32, "scores of the call")
    with pytest.raises(InputError, match="2 prompts but 1 completions"):
        scorer(["a", "b"], ["c"])
    with pytest.raises(InputError, match="completion 0: field 'completion' must be a string like the prompt"):
        scorer(["a"], [[{"role": "assistant", "content": "c"}]])


def eval_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(eval_main, [*argv, "--no-progress"])
    return exit_info.value.code


def test_eval_cli_reports_the_runs_final_accuracy_and_refuses_what_is_not_a_reward_model(
        trained, tiny_model_dir, pref_data, tmp_path, capsys):
    out = tmp_path / "eval"
    assert eval_cli(["--reward-model", str(trained / "adapter"), "--data", str(pref_data[1]), "--batch-size", "2",
                     "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    final = lines(trained, "eval")[-1]
    assert result["model"] == str(tiny_model_dir) and result["pairs"] == final["pairs"] == 6
    assert result["accuracy"] == final["eval/accuracy"]  # the same batches: the same comparisons
    assert abs(result["margin"] - final["eval/margin"]) < 1e-6 and abs(result["loss"] - final["loss"]) < 1e-6
    assert (out / "eval.md").read_text().strip() in capsys.readouterr().out
    assert len(result["scores"]) == 6 and result["scores"][0]["source"].endswith("eval.jsonl:1")

    plain = causal_lm_adapter(tiny_model_dir, tmp_path / "plain")
    bad_out = tmp_path / "bad"
    assert eval_cli(["--reward-model", str(plain), "--data", str(pref_data[1]), "--out", str(bad_out)]) == \
        EXIT_INPUT_ERROR
    assert "not a reward model" in capsys.readouterr().err
    assert eval_cli(["--model", str(tiny_model_dir), "--adapter", str(trained / "adapter"), "--data",
                     str(pref_data[1]), "--out", str(bad_out)]) == EXIT_INPUT_ERROR
    assert "a reward model (a score head beside LoRA); measure it with --reward-model" in capsys.readouterr().err
    assert not bad_out.exists()  # nothing written on bad input


def test_merge_refuses_a_reward_model(trained, tiny_model_dir, tmp_path):
    from engine.merge import merge_to_folder

    with pytest.raises(InputError, match="a reward model .*would give a causal LM without its head"):
        merge_to_folder(str(tiny_model_dir), str(trained / "adapter"), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------- real weights

def test_reward_model_on_smollm2_beats_the_untrained_head_on_held_out_pairs(smollm2_dir, tmp_path):
    """12 steps of 4 license pairs with LoRA on the attention of the last 8 of 30 blocks (the
    backward stops there: CPU time): held-out pairwise accuracy on the 16 eval pairs (unseen
    questions and alterations) rises from the untrained head's 7/16 to 14/16 with this seed (every
    seed and rate tried rose), the eval loss falls; PEFT scores the trained model as we do."""
    targets = ",".join(f"model.layers.{i}.self_attn.{p}" for i in range(22, 30) for p in ("q_proj", "v_proj"))
    cfg = TrainConfig(model=str(smollm2_dir), data=str(PREFS), eval_data=str(PREFS_EVAL), output=str(tmp_path / "run"),
                      method="reward", max_steps=12, batch_size=4, lr=1e-2, warmup_steps=1, max_len=128, lora_r=8,
                      lora_alpha=16, lora_dropout=0.0, target_modules=targets, seed=0)
    reward.train(cfg, progress=False)
    before, after = lines(tmp_path / "run", "eval")
    assert before["pairs"] == after["pairs"] == 16
    assert after["eval/accuracy"] >= before["eval/accuracy"] + 0.25, (before, after)
    assert after["loss"] < before["loss"] and after["eval/margin"] > before["eval/margin"]

    pairs, _ = load_preference_pairs(PREFS_EVAL, load_tokenizer(smollm2_dir), max_len=128)
    sequences = [pairs[0].prompt + pairs[0].chosen, pairs[0].prompt + pairs[0].rejected]
    ours = RewardModelScorer.load(tmp_path / "run" / "adapter", device="cpu", dtype="fp32").score_sequences(sequences)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(smollm2_dir, num_labels=1, dtype=torch.float32)
    hf.config.pad_token_id = None  # batch 1: pool at the last token (see the tiny-model PEFT test)
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        theirs = torch.stack([model(torch.tensor([seq])).logits[0, 0] for seq in sequences])
    assert_close(torch.tensor(ours), theirs, torch.float32, "PEFT scores vs ours (SmolLM2)", atol=LOGITS_FP32_ATOL,
                 rtol=0)
