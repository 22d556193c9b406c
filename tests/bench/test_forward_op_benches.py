"""The forward-only kernel benches (NF4 and int8 dequantization, FP8 row quantization) run on a
CPU as `bench.run_all` runs them on a GPU, so a broken bench is found here and not on a lent GPU."""

import importlib
import json

import pytest

from bench.common import CPU_NOTE


@pytest.mark.parametrize("stem, op, label, providers", [
    ("nf4", "nf4_dequant", "layer", {"torch", "bitsandbytes"}),
    ("int8", "int8_dequant", "layer", {"torch", "bitsandbytes"}),
    ("fp8_rows", "fp8_rows", "operand", {"torch"}),
])
def test_bench_writes_one_row_per_provider_and_shape(tmp_path, stem, op, label, providers):
    bench = importlib.import_module(f"bench.bench_{stem}")
    path = bench.main(["--quick", "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    assert path.name.startswith(f"{stem}-cpu-") and result["bench"] == stem
    rows = result["results"]
    assert {(r["provider"], r[label]) for r in rows} == {(p, s) for p in providers for s in bench.CPU_SHAPES}
    assert all(r["op"] == op and r["mode"] == "forward" and r["dtype"] == "float32" for r in rows)
    assert all(r["bytes_moved"] > 0 and r["median_ms"] > 0 for r in rows)
    assert "ours (Triton) not run on a CPU" in result["notes"] and CPU_NOTE in result["notes"]
