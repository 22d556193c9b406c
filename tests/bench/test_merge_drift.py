"""bench.merge_drift: a 2-step QLoRA run of the tiny model merged the five ways; the JSON reports the
figures each merged folder's merge.json records, and which --onto drifted less."""

import json
from pathlib import Path

from bench.merge_drift import MODES, main


def test_a_short_run_reports_each_folders_own_figures(tiny_model_dir, tmp_path, capsys):
    assert main(["--model", str(tiny_model_dir), "--steps", "2", "--batch-size", "4", "--drift-samples", "4",
                 "--device", "cpu", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
                 "--no-progress"]) == 0
    [path] = (tmp_path / "results").glob("merge-drift-cpu-*.json")
    payload = json.loads(path.read_text())
    rows = payload["results"]
    assert [(r["onto"], r["requantize"], r["dtype"]) for r in rows] == list(MODES)
    for row in rows:
        record = json.loads((Path(row["folder"]) / "merge.json").read_text())
        assert (record["onto"], record["requantize"]) == (row["onto"], row["requantize"])
        assert (row["kl"], row["top1"], row["tokens"]) == \
            (record["drift"]["kl"], record["drift"]["top1"], record["drift"]["tokens"])
        assert row["samples"] == 4 and row["tokens"] > 0
    assert payload["nf4_base_without_adapter"]["tokens"] == rows[0]["tokens"]  # the same samples
    for rq in ("none", "nf4"):
        kl = {r["onto"]: r["kl"] for r in rows if r["requantize"] == rq and r["dtype"] == "bf16"}
        assert payload["lower_drift_onto"][rq] == min(kl, key=kl.get)
    assert payload["default_is_lower"] == (payload["lower_drift_onto"] == payload["default_onto"])
    assert "| quantized | none | bf16 |" in capsys.readouterr().out
