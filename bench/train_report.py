"""The arithmetic of the training benchmark's figures: parameter count, MFU, ratios between providers.

MFU (model FLOP utilisation) follows the usual training convention (PaLM, appendix B):

    MFU = 6 · N · tokens_per_s / peak_flops

with N the model's parameter count (every weight of the config: embedding, blocks, norms, the head
unless tied; quantization does not change it) and ``peak_flops`` the bf16 matmul rate MEASURED in
the same run (`measure_matmul_flops`: median of a few (n × n) @ (n × n) products, 2·n³ FLOP each),
not the datasheet's. 6·N counts a forward (2N) and a backward with weight gradients (4N); a LoRA
step skips the frozen weights' gradients but recomputes the forward under checkpointing, so its
real work is also about 6N per token (2N forward + 2N recompute + 2N input gradients). Attention's
T² FLOPs are not counted, as in the convention.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import torch


def param_count(config: Mapping) -> int:
    """Parameters of a Llama ``config.json`` (a dict of HF names):

    V·H (embedding) + L · (H·(n_q + 2·n_kv)·hd + n_q·hd·H + 3·H·I + 2·H) + H (final norm)
    + V·H (head, unless tied), plus the biases when ``attention_bias`` / ``mlp_bias``."""
    V, H, I, L = (config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"))
    n_q = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_q
    hd = config.get("head_dim") or H // n_q
    attention = H * (n_q + 2 * n_kv) * hd + n_q * hd * H
    if config.get("attention_bias"):
        attention += (n_q + 2 * n_kv) * hd + H
    mlp = 3 * H * I + (2 * I + H if config.get("mlp_bias") else 0)
    head = 0 if config.get("tie_word_embeddings") else V * H
    return V * H + L * (attention + mlp + 2 * H) + H + head


def mfu(n_params: int, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """6 · N · tokens/s / peak FLOP/s; None without a measured peak."""
    if not peak_flops or not tokens_per_s:
        return None
    return 6 * n_params * tokens_per_s / peak_flops


def measure_matmul_flops(device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                         warmup: int = 3, reps: int = 7) -> float:
    """Median FLOP/s of ``a @ b`` on (n, n) random operands: 2·n³ FLOP per product, each timed
    alone between two device synchronisations."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        torch.mm(a, b)
    samples = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        samples.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(samples)


def _row(rows: Sequence[dict], case: str, provider: str) -> dict | None:
    """The measured row of ``provider`` in ``case`` (None if it did not run or failed)."""
    return next((r for r in rows if r["case"] == case and r["provider"] == provider
                 and r.get("tokens_per_s")), None)


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 4) if num and den else None


def case_ratios(rows: Sequence[dict], ours: str = "ours") -> dict[str, dict]:
    """Per case, ours against each peer: ``tokens_per_s_over_<peer>`` (> 1: ours faster),
    ``peak_memory_over_<peer>`` (< 1: ours smaller) and ours' ``mfu``. A peer that did not run
    gives None, never a made-up figure."""
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = _row(rows, case, ours)
        entry: dict = {"mfu": mine.get("mfu") if mine else None}
        for peer in dict.fromkeys(r["provider"] for r in rows if r["case"] == case and r["provider"] != ours):
            other = _row(rows, case, peer)
            entry[f"tokens_per_s_over_{peer}"] = _ratio(mine and mine["tokens_per_s"], other and other["tokens_per_s"])
            entry[f"peak_memory_over_{peer}"] = _ratio(mine and mine.get("peak_mem_bytes"),
                                                       other and other.get("peak_mem_bytes"))
        out[case] = entry
    return out
