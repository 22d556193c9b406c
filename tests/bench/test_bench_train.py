"""bench.bench_train's GPU-part plumbing on a CPU: job order, time limits, fail-soft providers."""

import json

from bench import bench_train, train_providers
from bench.run_all import plan
from bench.train_providers import Case, run_provider


def test_jobs_run_ours_and_hf_first_and_liger_last():
    jobs = bench_train.gpu_jobs(["a", "b"], ["ours", "hf_peft", "unsloth", "ours_fsdp", "liger"])
    assert jobs == [("a", "ours"), ("a", "hf_peft"), ("b", "ours"), ("b", "hf_peft"), ("a", "unsloth"),
                    ("b", "unsloth"), ("a", "ours_fsdp"), ("a", "liger"), ("b", "liger")]


def test_job_limit_caps_and_skips():
    assert bench_train.job_limit(1000) == bench_train.WORKER_MAX_S
    assert bench_train.job_limit(60) == 60
    assert bench_train.job_limit(bench_train.WORKER_MIN_S - 1) is None


def test_a_provider_that_fails_is_a_row_with_its_reason(tiny_model_dir, monkeypatch):
    def missing(case):
        raise ModuleNotFoundError("No module named 'unsloth'")

    monkeypatch.setitem(train_providers.PROVIDERS, "unsloth", missing)
    case = Case("tiny", str(tiny_model_dir), "cpu", "fp32", "none", 1, 8)
    row = run_provider(case, "unsloth", warmup=0, steps=1)
    assert row == {"case": "tiny", "provider": "unsloth", "status": "error: ModuleNotFoundError: No module named 'unsloth'"}


def test_ours_runs_full_rows_and_reports_tokens(tiny_model_dir):
    case = Case("tiny", str(tiny_model_dir), "cpu", "fp32", "none", 2, 16)
    row = run_provider(case, "ours", warmup=0, steps=2)
    assert row["status"] == "ok" and len(row["step_times_s"]) == 2
    # the row rounds the median step to 0.1 ms: 32 tokens over it, within what that rounding moves
    rounding = 32 * 0.5e-4 / (row["median_step_s"] - 0.5e-4) ** 2 + 0.005
    assert abs(row["tokens_per_s"] - 32 / row["median_step_s"]) <= rounding
    assert all(loss > 0 for loss in row["losses"])


def test_tokenizer_written_for_unsloth_loads(tmp_path):
    import transformers

    bench_train.write_tokenizer(tmp_path, {"bos_token_id": 1, "max_position_embeddings": 4096})
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (3, 2, 1)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 4096


def test_run_all_plan_keeps_the_train_budget():
    steps = dict(plan(470, ["nf4", "lora"], quick=True, tests=True, train=True))
    assert steps["bench_train --part gpu"] is not None and steps["bench_train --part gpu"] >= 240
    assert sum(v for v in steps.values() if v) <= 470 + 30  # the budget, plus the train's grace
    assert dict(plan(200, ["nf4"], quick=True, tests=True, train=True))["tests/kernels"] is None


def test_ours_under_fsdp_on_one_rank_trains_what_ours_trains(tiny_model_dir, tmp_path):
    """The ``ours_fsdp`` provider (a process group of one, in a process of its own as on the GPU)
    runs the same steps as ``ours``: the same losses, to the fp32 table."""
    import subprocess
    import sys
    from dataclasses import asdict

    import torch

    from tests.tolerances import assert_close

    case = Case("tiny", str(tiny_model_dir), "cpu", "fp32", "none", 2, 16)
    out = tmp_path / "row.json"
    subprocess.run([sys.executable, "-m", "bench.train_providers", "--provider", "ours_fsdp", "--case",
                    json.dumps(asdict(case)), "--warmup", "0", "--steps", "3", "--out", str(out)], check=True,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    fsdp = json.loads(out.read_text())
    ours = run_provider(case, "ours", warmup=0, steps=3)
    assert fsdp["status"] == "ok" and fsdp["losses"][-1] != fsdp["losses"][0]
    assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ours["losses"]), torch.float32, name="losses")


def test_base_variants_run_ours_on_other_frozen_bases_of_the_last_shape():
    jobs = bench_train.gpu_jobs(["a", "b"], ["ours", "hf_peft", "ours_fp8", "ours_bf16"])
    assert jobs == [("a", "ours"), ("a", "hf_peft"), ("b", "ours"), ("b", "hf_peft"), ("b", "ours_fp8"),
                    ("b", "ours_bf16")]
    assert [bench_train.case_name("b", bench_train.BASE_VARIANTS[p]) for _, p in jobs[4:]] == ["b/lora/fp8", "b/lora/bf16"]
    assert bench_train.case_name("a") == "a/qlora/nf4"


def test_run_all_variants_are_benches_with_their_own_results(tmp_path):
    """A run_all entry that is another bench's module with arguments (``lora_group_fp8``: the
    grouped projections over FP8 bases) writes its own JSON files, ``<name>-*.json`` (what
    run_bench looks for), and has that bench's targets (small CPU shapes, in process)."""
    import importlib

    from bench.run_all import EXTRA_BENCHES, VARIANTS
    from bench.targets import check

    for name, (stem, extra) in VARIANTS.items():
        assert name in EXTRA_BENCHES
        path = importlib.import_module(f"bench.bench_{stem}").main([*extra, "--out", str(tmp_path)])
        assert path.name.startswith(f"{name}-") and path.parent == tmp_path
        assert check(name, []) != []
