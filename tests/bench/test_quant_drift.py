"""bench.quant_drift: the drift metrics against a direct torch computation on a tiny random model in
int8 and FP8 (a model against itself drifts 0), the base bytes against `quantized_bytes`, and a short
run of the script on the tiny model folder."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from bench.quant_drift import FORMATS, DriftSums, base_linear_bytes, drift_sums, main
from models.config import LlamaConfig
from models.llama import LlamaForCausalLM
from models.quantized import quantize_linears, quantized_bytes, should_quantize
from tests.tolerances import assert_close

TINY = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def dense_and_ids():
    torch.manual_seed(0)
    return LlamaForCausalLM(TINY).eval(), torch.randint(0, TINY.vocab_size, (2, 13))


@torch.no_grad()
def flat_logits(model, ids) -> torch.Tensor:
    z = model(ids)
    return z.reshape(-1, z.shape[-1]).float()


def test_a_model_against_itself_drifts_nothing(dense_and_ids):
    model, ids = dense_and_ids
    z = flat_logits(model, ids)
    means = drift_sums(z, z.clone()).means()
    assert means == {"kl": 0.0, "top1": 1.0, "mean_abs_logit_diff": 0.0, "tokens": ids.numel()}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_metrics_match_a_direct_computation(dense_and_ids, fmt):
    """KL(p ‖ q) = Σ_v p (log p − log q) per position, top-1 agreement and mean |Δz|, all in fp64
    as `drift_sums` computes them, against `drift_sums` over two uneven chunks (`DriftSums.add`)."""
    model, ids = dense_and_ids
    quantized = copy.deepcopy(model)
    assert quantize_linears(quantized, fmt=fmt)
    z0, z = flat_logits(model, ids), flat_logits(quantized, ids)
    log_p, log_q = F.log_softmax(z0.double(), -1), F.log_softmax(z.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    top1 = (z0.argmax(-1) == z.argmax(-1)).double().mean()
    dz = (z0.double() - z.double()).abs().mean()
    sums = DriftSums()
    for rows in (slice(0, 9), slice(9, None)):
        sums.add(drift_sums(z0[rows], z[rows]))
    means = sums.means()
    assert means["tokens"] == ids.numel()
    assert kl > 0 and dz > 0  # the format did round the weights
    assert_close(torch.tensor(means["kl"], dtype=torch.float64), kl, name="kl")
    assert means["top1"] == top1.item()
    assert_close(torch.tensor(means["mean_abs_logit_diff"], dtype=torch.float64), dz, name="mean |dz|")


@pytest.mark.parametrize("fmt", ["int8", "fp8", "nf4"])
def test_base_bytes_are_the_formats_bytes(dense_and_ids, fmt):
    model, _ = dense_and_ids
    shapes = [m.weight.shape for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and should_quantize(n + ".weight")]
    assert base_linear_bytes(model) == sum(4 * o * i for o, i in shapes)  # fp32 dense
    quantized = copy.deepcopy(model)
    quantize_linears(quantized, fmt=fmt)
    assert base_linear_bytes(quantized) == sum(quantized_bytes(fmt, o, i) for o, i in shapes)


def test_a_short_run_writes_every_format(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "drift.json"
    assert main(["--model", str(tiny_model_dir), "--tokens", "64", "--row-len", "32", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [r["format"] for r in payload["results"]] == list(FORMATS)
    assert payload["setup"]["positions"] == 64 and payload["setup"]["reference"] == "dense fp32"
    assert {"device_name", "git_commit", "date"} <= set(payload["environment"])
    for row in payload["results"]:
        assert row["tokens"] == 64 and row["kl"] >= 0 and 0 <= row["top1"] <= 1
    sizes = {r["format"]: r["base_bytes"] for r in payload["results"]}
    assert sizes["int8"] == sizes["fp8"] < 2 * sizes["bf16"] == payload["reference_base_bytes"]
    assert "| int8 | fp32 |" in capsys.readouterr().out
