"""bench.train_report and the train checks of bench.targets: parameter count, MFU, ratios, verdicts."""

import dataclasses

import pytest
import torch

from bench.targets import check
from bench.train_report import case_ratios, measure_matmul_flops, mfu, param_count
from models.llama import LlamaForCausalLM
from models.presets import PRESETS


@pytest.mark.parametrize("preset", ["llama2-7b", "llama3.1-8b", "smollm2-135m"])
def test_param_count_matches_the_model(preset):
    cfg = PRESETS[preset].config
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert param_count(cfg.to_hf_config()) == sum(p.numel() for p in model.parameters())


def test_param_count_of_llama2_7b_is_the_published_figure():
    assert param_count(PRESETS["llama2-7b"].config.to_hf_config()) == 6_738_415_616


def test_param_count_counts_biases():
    cfg = dataclasses.replace(PRESETS["smollm2-135m"].config, attention_bias=True, mlp_bias=True,
                              num_hidden_layers=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert param_count(cfg.to_hf_config()) == sum(p.numel() for p in model.parameters())


def test_mfu_is_six_n_tokens_over_peak():
    # 7e9 parameters at 10,000 tokens/s on a 1e15 FLOP/s device: 6 * 7e9 * 1e4 / 1e15 = 0.42.
    assert mfu(7_000_000_000, 10_000.0, 1e15) == pytest.approx(0.42)
    assert mfu(7_000_000_000, 10_000.0, None) is None


def test_measured_matmul_flops_is_positive():
    assert measure_matmul_flops("cpu", n=64, dtype=torch.float32, warmup=1, reps=3) > 0


def _row(case, provider, tokens_per_s=None, peak=None, mfu_=None, status="ok"):
    row = {"case": case, "provider": provider, "status": status}
    if tokens_per_s:
        row.update(tokens_per_s=tokens_per_s, peak_mem_bytes=peak, mfu=mfu_)
    return row


ROWS = [_row("7b", "ours", 9000.0, 6e9, 0.55), _row("7b", "hf_peft", 2500.0, 12e9),
        _row("7b", "unsloth", 7000.0, 7e9), _row("7b", "liger", status="error: ModuleNotFoundError"),
        _row("8b", "ours", 8000.0, 9e9, 0.52), _row("8b", "hf_peft", 2000.0, 16e9),
        _row("8b", "unsloth", status="skipped: out of time")]


def test_case_ratios_give_none_for_a_peer_that_did_not_run():
    ratios = case_ratios(ROWS)
    assert ratios["7b"]["tokens_per_s_over_hf_peft"] == pytest.approx(3.6)
    assert ratios["7b"]["peak_memory_over_hf_peft"] == pytest.approx(0.5)
    assert ratios["7b"]["tokens_per_s_over_unsloth"] == pytest.approx(9 / 7, abs=1e-4)
    assert ratios["7b"]["tokens_per_s_over_liger"] is None
    assert ratios["8b"]["tokens_per_s_over_unsloth"] is None
    assert ratios["8b"]["mfu"] == 0.52


def test_train_checks_take_the_worst_case_and_leave_missing_peers_without_verdict():
    by_check = {h.check: h for h in check("train", ROWS)}
    assert set(by_check) == {"ours / hf_peft tokens/s", "ours / unsloth tokens/s", "ours / hf_peft peak memory",
                             "ours MFU", "ours / ours_fsdp (1 rank) tokens/s"}
    assert by_check["ours / ours_fsdp (1 rank) tokens/s"].value is None  # not run: no verdict, no figure
    speed = by_check["ours / hf_peft tokens/s"]
    assert (speed.value, speed.where, speed.ok) == (pytest.approx(3.6), "7b", True)  # min(3.6, 4.0)
    memory = by_check["ours / hf_peft peak memory"]
    assert (memory.value, memory.where, memory.ok) == (pytest.approx(0.5625), "8b", True)  # max(0.5, 0.5625)
    unsloth = by_check["ours / unsloth tokens/s"]
    assert (unsloth.value, unsloth.ok) == (pytest.approx(9 / 7, abs=1e-4), True)  # 8b's Unsloth did not run
    assert by_check["ours MFU"].value == pytest.approx(0.52)


def test_train_checks_fail_below_target_and_give_no_verdict_without_ours():
    slow = [_row("7b", "ours", 5000.0, 10e9, 0.3), _row("7b", "hf_peft", 2500.0, 12e9)]
    by_check = {h.check: h for h in check("train", slow)}
    assert by_check["ours / hf_peft tokens/s"].ok is False  # 2.0 < 3
    assert by_check["ours / hf_peft peak memory"].ok is False  # 0.83 > 0.6
    assert by_check["ours MFU"].ok is False
    assert all(h.ok is None and h.value is None for h in check("train", [_row("7b", "hf_peft", 2500.0, 12e9),
                                                                        _row("7b", "ours", status="exit 1")]))
