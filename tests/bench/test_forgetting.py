"""bench.forgetting: each setting differs from plain SFT by its mitigation flags only, and a short
run of two settings writes the table and the JSON from the runs' own figures."""

import json

import pytest

from bench.forgetting import SETTINGS, main, setting_flags
from engine.run.metrics import read_metrics


def test_each_setting_adds_only_its_mitigation():
    assert setting_flags("plain", 0.25, 0.5) == {}
    assert setting_flags("kl", 0.25, 0.5) == {"kl_to_base": 0.5}
    assert set(setting_flags("replay", 0.25, 0.5)) == {"replay_data", "replay_ratio"}
    assert set(setting_flags("replay+kl", 0.25, 0.5)) == {"replay_data", "replay_ratio", "kl_to_base"}
    assert setting_flags("replay", 0.25, 0.5)["replay_data"].endswith("examples/general_replay.jsonl")
    assert SETTINGS == ("plain", "replay", "kl", "replay+kl")


def test_a_short_run_reports_the_runs_figures(tiny_model_dir, tmp_path, capsys):
    assert main(["--model", str(tiny_model_dir), "--settings", "plain,kl", "--steps", "2", "--eval-every", "0",
                 "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--no-progress"]) == 0
    [path] = (tmp_path / "results").glob("forgetting-*.json")
    payload = json.loads(path.read_text())
    rows = {r["setting"]: r for r in payload["results"]}
    assert list(rows) == ["plain", "kl"] and rows["kl"]["flags"] == {"kl_to_base": 0.5}
    for name, row in rows.items():
        last = [r for r in read_metrics(tmp_path / "runs" / name / "metrics.jsonl") if r["kind"] == "eval"][-1]
        assert (row["domain_loss"], row["retain_loss_delta"], row["retain_kl"]) == \
            (last["loss"], last["retain/loss_delta"], last["retain/kl"])
    assert [r["name"] for r in payload["engine_eval"]["rows"]][1:] == [rows[n]["adapter"] for n in rows]
    assert (tmp_path / "runs" / "eval" / "eval_tradeoff.png").is_file()
    assert "| kl |" in capsys.readouterr().out


def test_an_unknown_setting_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--settings", "plain,dropout", "--out", str(tmp_path)])
