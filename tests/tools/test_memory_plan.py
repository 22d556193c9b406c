"""`tools.memory_plan` / `tools.memory_parts`: the per-block enumerations equal what autograd
saves (both code paths), the NF4 bytes equal the quantized module's, the CPU prediction for a
real SmolLM2 run is within 15 % of its measured peak RSS increase, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.errors import InputError
from kernels.backend import set_kernel_mode
from kernels.nf4 import keep_dequantized
from models.attention import DocumentLayout
from models.config import LlamaConfig
from models.loading import read_config
from models.presets import PRESETS
from models.quantized import NF4Linear, QuantizedLinear, quantized_bytes
from tests.lora_models import tiny_lora_model
from tools import memory_plan
from tools.memory_parts import (
    CUDA_ALLOCATOR_SLACK,
    LINEARS,
    Setup,
    base_weight_bytes,
    block_backward_transient,
    block_tensors,
    fp8_transient,
    linear_shapes,
    lora_param_count,
    mlp_chunk_saved,
    nf4_bytes,
    plan,
    saved_per_block,
    shard_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5)
T, LENGTHS = 40, [[13, 27]]  # one packed row of two documents, as the engine's batches are


def block_saved_bytes(quant: str, targets: tuple[str, ...], dropout: float, recompute: bool,
                      chunk: int | None = None) -> int:
    """Bytes of the tensors autograd saves while one decoder block runs forward (its input
    requires grad), excluding parameters, buffers and the inputs shared by all blocks (positions,
    rotary frequencies, the layout): unique storages, each counted once. With MLP chunks, what
    the block saves around them (each chunk's own saves are its checkpoint's, dropped)."""
    model = tiny_lora_model(TINY, quant, dropout, targets, lora_b_std=None)
    model.mlp_chunk_tokens = chunk
    block = model.model.layers[1]
    layout = DocumentLayout.from_lengths(LENGTHS)
    positions, inv_freq = layout.positions(), model.model.inv_freq
    x = torch.randn(1, T, TINY.hidden_size, requires_grad=True)
    shared = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), positions,
                                                       inv_freq, layout.doc_ids)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in shared:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if recompute:
            with keep_dequantized():
                block(x, positions, inv_freq, layout, None)
        else:
            block(x, positions, inv_freq, layout, None)
    return sum(saved.values())


CASES = [("none", LINEARS, 0.1), ("none", LINEARS, 0.0), ("nf4", LINEARS, 0.1),
         ("none", ("q_proj", "v_proj", "down_proj"), 0.0), ("none", ("k_proj", "o_proj", "up_proj"), 0.1)]
CHUNK = 16  # tokens per MLP chunk: T = 40 makes chunks of 16, 16, 8
CHUNKED_CASES = [("none", LINEARS, 0.0), ("nf4", LINEARS, 0.1), ("none", ("q_proj", "v_proj"), 0.0)]


@pytest.mark.parametrize("quant, targets, dropout, chunk", [(*c, None) for c in CASES] +
                         [(*c, CHUNK) for c in CHUNKED_CASES])
@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_saved_per_block_is_what_autograd_saves(path, quant, targets, dropout, chunk):
    """The enumeration of `tools.memory_parts` against the real block: the CPU reference path,
    and the kernel path (the Triton Functions, in the interpreter here; recomputed under
    keep_dequantized), to the byte; with MLP chunks too (then the block keeps normed2 for the
    chunks even when gate/up have no LoRA)."""
    recompute = path == "kernel"
    mode = "triton" if path == "kernel" else "auto"
    with set_kernel_mode(mode):
        measured = block_saved_bytes(quant, targets, dropout, recompute, chunk)
    setup = Setup(TINY, tokens=T, quant=quant, dtype_bytes=4, lora_rank=4, targets=targets, lora_dropout=dropout,
                  mlp_chunk=chunk, device="cuda" if path == "kernel" else "cpu")
    predicted = saved_per_block(setup, recompute=recompute)
    assert measured == predicted, f"{path}: autograd saved {measured} B, predicted {predicted} B"


@pytest.mark.parametrize("quant, targets, dropout", CASES[:3])
@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_mlp_chunk_saves_are_what_autograd_saves(path, quant, targets, dropout):
    """`mlp_chunk_saved` against what one MLP of ``rows`` tokens saves, measured as above (its
    input, which the block holds, and the parameters excluded); on the kernel path in the
    chunk's recompute context, keep_dequantized."""
    rows = 11
    model = tiny_lora_model(TINY, quant, dropout, targets, lora_b_std=None)
    mlp = model.model.layers[1].mlp
    x = torch.randn(rows, TINY.hidden_size, requires_grad=True)
    shared = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), x)}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in shared:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with set_kernel_mode("triton" if path == "kernel" else "auto"), keep_dequantized(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x)
    setup = Setup(TINY, tokens=T, quant=quant, dtype_bytes=4, lora_rank=4, targets=targets, lora_dropout=dropout,
                  mlp_chunk=CHUNK, device="cuda" if path == "kernel" else "cpu")
    assert sum(saved.values()) == mlp_chunk_saved(setup, rows)


@pytest.mark.parametrize("n", [64 * 256 * 3 + 5, 77 * 123, 4096 * 14336])
def test_nf4_bytes_are_those_of_the_quantized_module(n):
    """Exactly the bytes of an NF4Linear's buffers (codes, absmax codes, nested stats, tables)."""
    if n > 10**7:  # the 8B's MLP weight, from its layout without quantizing 59M values
        blocks = -(-n // 64)
        assert nf4_bytes(n) == n // 2 + blocks + 4 * -(-blocks // 256) + 4 + 4 * (16 + 256)
        return
    module = NF4Linear.from_linear(torch.nn.Linear(n, 1, bias=False).requires_grad_(False))  # weight (1, n)
    assert nf4_bytes(n) == sum(b.numel() * b.element_size() for b in module.buffers())


def measure(smollm2_dir: Path, tmp_path: Path, extra: list[str]) -> int:
    """Peak RSS increase of a 2-step CPU run of the SmolLM2 fixture (tools.measure_rss)."""
    out = tmp_path / "rss.json"
    train = ["--model", str(smollm2_dir), "--data", str(ROOT / "examples" / "license_qa.jsonl"), "--max-steps", "2",
             "--batch-size", "1", "--pack", "--max-len", "256", "--lora-r", "8", "--output", str(tmp_path / "run"),
             *extra]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's CPU run
    subprocess.run([sys.executable, "-m", "tools.measure_rss", "--out", str(out), "--", *train], cwd=ROOT,
                   check=True, capture_output=True, env={**env, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())["increase_bytes"]


@pytest.mark.parametrize("flags", [[], ["--offload-activations"], ["--mlp-chunk-tokens", "64"]],
                         ids=["no-checkpointing", "offload", "mlp-chunks"])
def test_cpu_prediction_is_within_15_percent_of_the_measured_peak_rss(smollm2_dir, tmp_path, flags):
    """SmolLM2-135M, packed rows of 256 tokens, LoRA r = 8 (dropout 0.05), 2 steps on the CPU:
    the plan for that step against the peak RSS increase of the real run. Without checkpointing
    MLP chunks of 64 tokens hold ~20 % less (each block keeps no MLP tensors)."""
    measured = measure(smollm2_dir, tmp_path, flags)
    offload = "--offload-activations" in flags
    chunk = int(flags[1]) if "--mlp-chunk-tokens" in flags else None
    setup = Setup(read_config(Path(smollm2_dir)), tokens=256, dtype_bytes=4, lora_rank=8, device="cpu",
                  checkpointing=offload, offload=offload, mlp_chunk=chunk)
    predicted = plan(setup).peak
    print(f"SmolLM2 CPU {flags or 'no checkpointing'}: predicted {predicted / 2**20:.0f} MiB, "
          f"measured {measured / 2**20:.0f} MiB ({predicted / measured - 1:+.1%})")
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


def test_the_acceptance_command_prints_each_part_and_the_verdict(capsys):
    memory_plan.main(["--model", "llama3.1-8b", "--quant", "nf4", "--tokens", "342733", "--offload-activations",
                      "--gpu-mem", "80GiB"])
    out = capsys.readouterr().out
    for part in ("base weights", "embeddings, head, norms", "LoRA params + grads + AdamW", "saved activations",
                 "largest transient", "CUDA context + allocator", "peak", "host (pinned) memory"):
        assert part in out
    assert "fit in 80.00 GiB" in out or "fits in 80.00 GiB" in out


@pytest.mark.parametrize("flags", [[], ["--offload-activations"], ["--offload-activations", "--mlp-chunk-tokens", "8192"],
                                   ["--gpus", "2", "--strategy", "fsdp"], ["--gpus", "4", "--strategy", "ddp"]])
def test_max_context_is_the_longest_row_that_fits(capsys, flags):
    argv = ["--model", "llama3.1-8b", "--quant", "nf4", "--gpu-mem", "80GiB", "--max-context", *flags]
    memory_plan.main(argv)
    longest = int(capsys.readouterr().out.rsplit("fits: ", 1)[1].split()[0].replace(",", ""))
    args = memory_plan.parser().parse_args(argv)
    assert plan(memory_plan.setup_from_args(args, longest)).peak <= 80 * 2**30
    assert plan(memory_plan.setup_from_args(args, longest + 1)).peak > 80 * 2**30


def test_mlp_chunks_shrink_the_recomputed_block_and_beat_the_unsloth_figure(capsys):
    """At 342,733 tokens with offload the recomputed block's MLP terms scale with the chunk: the
    largest transient falls by (N − C) · (5I·e + 3·4r) − N·H·e against the unchunked plan (the
    SwiGLU's saves and backward, the MLP LoRA's h; plus the chunk inputs' gradients), and the
    step fits in 80 GiB (a prediction)."""
    argv = ["--model", "llama3.1-8b", "--quant", "nf4", "--tokens", "342733", "--offload-activations",
            "--gpu-mem", "80GiB"]
    args = memory_plan.parser().parse_args(argv)
    whole = plan(memory_plan.setup_from_args(args, 342733))
    args = memory_plan.parser().parse_args(argv + ["--mlp-chunk-tokens", "8192"])
    chunked = plan(memory_plan.setup_from_args(args, 342733))
    N, C, H, I, e, r = 342733, 8192, 4096, 14336, 2, 16
    fall = (N - C) * (5 * I * e + 3 * 4 * r) - N * H * e
    assert whole.parts["largest transient"] - chunked.parts["largest transient"] == fall
    memory_plan.main(argv + ["--mlp-chunk-tokens", "8192"])
    out = capsys.readouterr().out
    assert "MLP chunks of 8,192" in out and "fits in 80.00 GiB" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "llama3.1-8b", "--tokens", "10", "--gpu-mem", "80 apples"], "expected a size"),
    (["--model", "llama3.1-8b", "--max-context"], "needs --gpu-mem"),
    (["--model", "llama3.1-8b"], "--tokens"),
    (["--model", "no-such-model", "--tokens", "10"], "not a preset"),
    (["--model", "llama3.1-8b", "--tokens", "10", "--targets", "q_proj,lm_head"], "--targets"),
    (["--model", "llama3.1-8b", "--tokens", "10", "--device", "cpu", "--dtype", "bf16"], "fp32"),
    (["--model", "llama3.1-8b", "--tokens", "10", "--offload-activations", "--no-grad-checkpointing"],
     "needs checkpointing"),
    (["--model", "llama3.1-8b", "--tokens", "10", "--mlp-chunk-tokens", "0"], "--mlp-chunk-tokens must be at least 1"),
    (["--model", "llama3.1-8b", "--tokens", "10", "--gpus", "2"], "needs --strategy ddp or fsdp"),
    (["--model", "llama3.1-8b", "--tokens", "10", "--gpus", "0", "--strategy", "fsdp"], "--gpus must be at least 1"),
    (["--model", "llama3.1-8b", "--tokens", "10", "--device", "cpu", "--strategy", "ddp"], "CUDA path only"),
])
def test_bad_input_names_the_flag(argv, message):
    with pytest.raises(InputError, match=message):
        memory_plan.main(argv)


def gpu_setup(model: str, quant: str, strategy: str = "single", gpus: int = 1, tokens: int = 8192) -> Setup:
    return Setup(PRESETS[model].config, tokens=tokens, quant=quant, gpus=gpus, strategy=strategy)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_fsdp_on_two_gpus_halves_the_sharded_parts(quant):
    """Llama-2-70B on 2 ranks: every block tensor's dim 0 is even, so the base weights and LoRA's
    params + grads + AdamW halve exactly — but for NF4's 1-element offset (4 bytes) per linear,
    which a rank holds whole; the root (embedding, head, final norm: (2V + 1)·H·e) is full plus
    its half shard; block norms halve."""
    cfg = PRESETS["llama2-70b"].config
    single, fsdp = plan(gpu_setup("llama2-70b", quant)).parts, plan(gpu_setup("llama2-70b", quant, "fsdp", 2)).parts
    L, H, V, e = 80, 8192, 32000, 2
    offsets = L * 7 * 4 if quant == "nf4" else 0
    assert 2 * fsdp["base weights"] - single["base weights"] == offsets
    assert 2 * fsdp["LoRA params + grads + AdamW"] == single["LoRA params + grads + AdamW"]
    assert fsdp["embeddings, head, norms"] == (2 * V + 1) * H * e * 3 // 2 + L * H * e
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (V, H, L)


@pytest.mark.parametrize("model, quant", [("llama3.1-8b", "none"), ("llama3.1-8b", "nf4"), ("llama2-70b", "nf4")])
def test_all_gather_buffers_are_two_whole_blocks(model, quant):
    """Two unsharded blocks: their base linears (one L-th of the single-GPU base weights,
    `nf4_bytes` for NF4), two norms 2·H·e, and the fp32 LoRA params; whatever the rank count.
    The unsharded gradients in flight are one block's LoRA params in fp32."""
    s = gpu_setup(model, quant)
    L, H = s.cfg.num_hidden_layers, s.cfg.hidden_size
    block = base_weight_bytes(s) // L + 2 * H * 2 + 4 * lora_param_count(s) // L
    for gpus in (2, 3, 8):
        parts = plan(gpu_setup(model, quant, "fsdp", gpus)).parts
        assert parts["all-gather buffers (2 blocks)"] == 2 * block
        assert parts["unsharded block gradients"] == 4 * lora_param_count(s) // L


def test_ddp_is_the_single_gpu_plan_plus_gradient_buckets():
    """Llama-3.1-8B, r = 16 on all 7 linears: 32 · 16 · Σ(in + out) = 41,943,040 LoRA params, a
    4-byte bucket copy each; the allocator's slack grows by 5 % of it; nothing else changes."""
    single = plan(gpu_setup("llama3.1-8b", "nf4"))
    for gpus in (1, 2, 8):
        ddp = plan(gpu_setup("llama3.1-8b", "nf4", "ddp", gpus))
        buckets = ddp.parts.pop("DDP gradient buckets")
        assert buckets == 4 * 41_943_040
        context = ddp.parts.pop("CUDA context + allocator") - single.parts["CUDA context + allocator"]
        assert abs(context - CUDA_ALLOCATOR_SLACK * buckets) <= 1
        assert ddp.parts == {k: v for k, v in single.parts.items() if k != "CUDA context + allocator"}


def test_70b_qlora_per_gpu_numbers_are_sane():
    """Llama-2-70B's 80 · 855,638,016 linear weights in NF4 cost 1/2 + 1/64 + 4/(64·256) bytes
    each: 16.4 GiB per GPU on 2 (the whole weights a rank holds, with the root and the gathered
    blocks, 17-19 GiB). On 2 × 24 GiB llama3.1-70b does not fit at all (its 128,256-token
    vocabulary: 2 × 2.1 GB embedding and head held whole), on 4 it does (predicted)."""
    parts = plan(gpu_setup("llama2-70b", "nf4", "fsdp", 2)).parts
    expected = 80 * 855_638_016 * (1 / 2 + 1 / 64 + 4 / (64 * 256)) / 2
    assert abs(parts["base weights"] / expected - 1) < 1e-3 and 16 < parts["base weights"] / 2**30 < 17
    held = parts["base weights"] + parts["embeddings, head, norms"] + parts["all-gather buffers (2 blocks)"]
    assert 17 < held / 2**30 < 19
    assert plan(gpu_setup("llama3.1-70b", "nf4", "fsdp", 2, tokens=1)).peak > 24 * 2**30
    assert plan(gpu_setup("llama3.1-70b", "nf4", "fsdp", 4, tokens=2048)).peak < 24 * 2**30


def test_the_multi_gpu_report_names_the_strategy_and_its_parts(capsys):
    memory_plan.main(["--model", "llama3.1-70b", "--quant", "nf4", "--gpus", "2", "--strategy", "fsdp",
                      "--tokens", "8192", "--gpu-mem", "80GiB"])
    out = capsys.readouterr().out
    assert "fsdp on 2 GPUs (per GPU, tokens per rank)" in out and "fits in 80.00 GiB" in out
    assert "all-gather buffers (2 blocks)" in out and "unsharded block gradients" in out


# --- the int8 and FP8 frozen bases ------------------------------------------------------------


@pytest.mark.parametrize("quant", ["int8", "fp8"])
@pytest.mark.parametrize("model", ["llama3.1-8b", "llama2-70b", "tiny"])
def test_int8_and_fp8_weight_bytes_are_the_quantized_bytes_of_the_block_linears(model, quant):
    """L · Σ `quantized_bytes` over the 7 linears of a block (out·in + 4·out each), the same bytes
    in FSDP's per-tensor enumeration; on the tiny model, the bytes of the quantized modules' buffers."""
    cfg = TINY if model == "tiny" else PRESETS[model].config
    s = Setup(cfg, tokens=8192, quant=quant)
    per_block = sum(quantized_bytes(quant, o, i) for o, i in linear_shapes(cfg).values())
    assert per_block == sum(o * i + 4 * o for o, i in linear_shapes(cfg).values())
    assert base_weight_bytes(s) == cfg.num_hidden_layers * per_block
    assert shard_bytes(block_tensors(s, "base"), 1) == per_block
    if model == "tiny":
        tiny = tiny_lora_model(TINY, quant, 0.0)
        held = sum(b.numel() * b.element_size() for m in tiny.modules() if isinstance(m, QuantizedLinear)
                   for b in m.buffers())
        assert held == base_weight_bytes(s)


INT8_FP8_CASES = [("int8", LINEARS, 0.1), ("fp8", LINEARS, 0.1), ("int8", ("q_proj", "down_proj"), 0.0),
                  ("fp8", ("k_proj", "up_proj"), 0.0)]


@pytest.mark.parametrize("quant, targets, dropout, chunk", [(*c, None) for c in INT8_FP8_CASES] +
                         [(*c, CHUNK) for c in INT8_FP8_CASES[:2]])
@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_int8_and_fp8_saved_per_block_is_what_autograd_saves(path, quant, targets, dropout, chunk):
    """As `test_saved_per_block_is_what_autograd_saves`: int8 is dequantized per product like NF4
    (its dense weights kept under keep_dequantized, saved by the reference's x·Wᵀ); FP8 saves no
    weight at all (its products, an autograd Function, keep a reference to the codes)."""
    mode = "triton" if path == "kernel" else "auto"
    with set_kernel_mode(mode):
        measured = block_saved_bytes(quant, targets, dropout, path == "kernel", chunk)
    setup = Setup(TINY, tokens=T, quant=quant, dtype_bytes=4, lora_rank=4, targets=targets, lora_dropout=dropout,
                  mlp_chunk=chunk, device="cuda" if path == "kernel" else "cpu")
    assert measured == saved_per_block(setup, recompute=path == "kernel")


@pytest.mark.parametrize("flags", [[], ["--offload-activations"], ["--no-grad-checkpointing"],
                                   ["--mlp-chunk-tokens", "4096"], ["--gpus", "2", "--strategy", "fsdp"]])
def test_int8_is_nf4_but_for_its_weight_bytes(flags):
    """int8 is dequantized to the compute dtype for every product, as NF4 is: every activation and
    transient part of the plan is NF4's; only the weights (and the allocator's 5 % of them) differ."""
    argv = ["--model", "llama3.1-8b", "--tokens", "8192", *flags]
    nf4, int8 = (plan(memory_plan.setup_from_args(memory_plan.parser().parse_args(argv + ["--quant", q]), 8192))
                 for q in ("nf4", "int8"))
    different = {"base weights", "CUDA context + allocator"} | ({"all-gather buffers (2 blocks)"} if flags[-1:] ==
                                                                 ["fsdp"] else set())
    assert {k: v for k, v in nf4.parts.items() if k not in different} == \
        {k: v for k, v in int8.parts.items() if k not in different}
    assert int8.parts["base weights"] > nf4.parts["base weights"]


def test_fp8_transient_is_the_largest_products_working_set():
    """Llama-3.1-8B, 8192 tokens: the widest operand is dY of gate/up (or x of down), N·I elements.
    On the GPU the Triton row quantizer holds only its e4m3 codes and scales (N·I + 4N), less than
    the product's codes, scales and transposed weight copy (N·I + 4N + I·H). On the reference path
    (a CPU run) the quantizer adds two fp32 copies of one block of ρ rows (8·ρ·I), and the fp32
    emulation of the product holds fp32 copies of both operands' codes, which is larger still
    (5·N·I + 4N + 4·I·H). It adds to the
    block backward; FP8 keeps no dense weight, so with checkpointing the recompute saves the dense
    plan's tensors, not NF4's weights. For one token the grouped forward of gate and up is the
    largest: x's codes and scale (H + 4) beside both weights' codes and scales (2·I·H + 8·I)."""
    from kernels.fp8_rows import ROW_CHUNK_ELEMENTS

    N, H, I = 8192, 4096, 14336
    rho = ROW_CHUNK_ELEMENTS // I
    fp8, none = Setup(PRESETS["llama3.1-8b"].config, tokens=N, quant="fp8"), \
        Setup(PRESETS["llama3.1-8b"].config, tokens=N)
    assert fp8_transient(fp8) == N * I + 4 * N + I * H
    on_cpu = Setup(PRESETS["llama3.1-8b"].config, tokens=N, quant="fp8", device="cpu")
    assert fp8_transient(on_cpu) == 5 * N * I + 4 * N + 4 * I * H > N * I + 4 * N + 8 * rho * I
    assert block_backward_transient(fp8) - block_backward_transient(none) == fp8_transient(fp8)
    assert saved_per_block(fp8, recompute=True) == saved_per_block(none, recompute=True)
    one_token = Setup(PRESETS["llama3.1-8b"].config, tokens=1, quant="fp8")
    assert fp8_transient(one_token) == H + 4 + 2 * I * H + 8 * I


@pytest.mark.parametrize("quant, note", [("int8", "int8 codes + fp32 row absmax"),
                                         ("fp8", "e4m3 codes + fp32 row scales")])
def test_the_command_line_takes_int8_and_fp8(capsys, quant, note):
    memory_plan.main(["--model", "llama3.1-8b", "--quant", quant, "--tokens", "8192", "--gpu-mem", "80GiB"])
    out = capsys.readouterr().out
    assert f"8,192 tokens (1 × 8,192), {quant}," in out and note in out and "fits in 80.00 GiB" in out
