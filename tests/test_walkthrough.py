"""The README walk-through, shortened for CI (fewer steps, the same learning-rate regime): SFT, then
DPO from the SFT adapter with the DPO defaults, then engine.eval. After DPO the model is intact:

* domain perplexity within 10 % of the SFT adapter's,
* general perplexity within 10 % of the base model's,
* held-out preference accuracy at least 0.8,

and no likelihood-displacement warning was given; the same DPO pushed with a learning rate forty
times the default (constant, six steps) is warned about. Real weights (the SmolLM2 fixture), real
example data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# The README's walk-through with fewer steps: SFT --max-steps 60 -> SFT_STEPS, DPO 30 -> DPO_STEPS, GRPO
# 20 -> GRPO_STEPS, each evaluated at its first and last step only (evaluation draws no random numbers:
# the steps are the same).
SFT_STEPS, DPO_STEPS, GRPO_STEPS = 24, 12, 10


def cli(module: str, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def walkthrough(smollm2_dir, tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("walkthrough")
    cli("engine.train", "--model", smollm2_dir, "--data", EXAMPLES / "license_qa.jsonl",
        "--eval-data", EXAMPLES / "license_qa_eval.jsonl", "--output", runs / "sft", "--max-steps", SFT_STEPS,
        "--lr", "5e-4", "--max-len", "256", "--eval-every", SFT_STEPS)
    dpo = ["--method", "dpo", "--model", smollm2_dir, "--init-adapter", runs / "sft" / "adapter",
           "--data", EXAMPLES / "license_prefs.jsonl", "--eval-data", EXAMPLES / "license_prefs_eval.jsonl",
           "--max-len", "256"]
    cli("engine.train", *dpo, "--output", runs / "dpo", "--max-steps", DPO_STEPS, "--eval-every", DPO_STEPS)
    cli("engine.eval", "--model", smollm2_dir, "--adapter", runs / "sft" / "adapter", "--adapter",
        runs / "dpo" / "adapter", "--data", EXAMPLES / "license_qa_eval.jsonl", "--general",
        EXAMPLES / "general_text.jsonl", "--out", runs / "eval", "--no-progress")
    rows = {row["name"]: row for row in json.loads((runs / "eval" / "eval.json").read_text())["rows"]}
    return {"runs": runs, "dpo_args": dpo, "model": smollm2_dir, "base": rows["base"],
            "sft": rows[str(runs / "sft" / "adapter")],
            "dpo": rows[str(runs / "dpo" / "adapter")]}


def test_dpo_after_sft_keeps_the_model_intact(walkthrough):
    base, sft, dpo = walkthrough["base"], walkthrough["sft"], walkthrough["dpo"]
    assert sft["domain"]["perplexity"] < 0.5 * base["domain"]["perplexity"]  # SFT learned the domain
    assert dpo["domain"]["perplexity"] <= 1.10 * sft["domain"]["perplexity"], (sft["domain"], dpo["domain"])
    assert dpo["general"]["perplexity"] <= 1.10 * base["general"]["perplexity"], (base["general"], dpo["general"])
    final = [r for r in records(walkthrough["runs"] / "dpo") if r["kind"] == "eval"][-1]
    assert final["eval/rewards/accuracies"] >= 0.8, final
    assert not [r for r in records(walkthrough["runs"] / "dpo") if r["kind"] == "warning"]


def test_a_far_too_high_learning_rate_is_warned_about(walkthrough):
    out = walkthrough["runs"] / "dpo-too-high"
    result = cli("engine.train", *walkthrough["dpo_args"], "--output", out, "--max-steps", "6", "--eval-every", "6",
                 "--lr", "2e-3", "--lr-schedule", "constant")
    warnings = [r for r in records(out) if r["kind"] == "warning"]
    assert len(warnings) == 1 and "likelihood displacement" in warnings[0]["message"], warnings
    assert "likelihood displacement" in result.stderr
    summary = json.loads((out / "run_complete.json").read_text())
    assert summary["warnings"] == [warnings[0]["message"]]


def test_grpo_after_sft_raises_the_held_out_reward(walkthrough):
    """SFT → GRPO on the arithmetic prompts, graded by the final number: the held-out greedy reward
    (the SFT adapter's at step 0) rises by at least 0.15 and ends at 0.7 or more (measured: 0.50 →
    0.91 here; the README's run: 0.69 → 0.97 in 20 steps; the base model scores 0.22). Sampling makes
    the run sensitive to float rounding (another thread count samples other answers), hence the
    margin."""
    out = walkthrough["runs"] / "grpo"
    cli("engine.train", "--method", "grpo", "--model", walkthrough["model"], "--init-adapter",
        walkthrough["runs"] / "sft" / "adapter", "--data", EXAMPLES / "arithmetic.jsonl", "--eval-data",
        EXAMPLES / "arithmetic_eval.jsonl", "--reward", "number", "--output", out, "--batch-size", "2",
        "--num-generations", "8", "--max-completion-len", "24", "--max-len", "128", "--temperature", "0.8",
        "--lr", "1e-4", "--max-steps", GRPO_STEPS, "--eval-every", GRPO_STEPS)
    evals = [r for r in records(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, GRPO_STEPS]
    start, end = evals[0]["eval/reward"], evals[-1]["eval/reward"]
    assert end >= start + 0.15 and end >= 0.7, (start, end)
    assert (out / "reward.png").is_file() and (out / "completions.jsonl").is_file()
