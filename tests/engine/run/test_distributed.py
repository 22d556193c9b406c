"""The pieces of `engine.run.distributed` that need no second process (the torchrun runs are in
tests/distributed)."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InputError
from engine.run.distributed import Parallel, local_frozen_bytes, micro_batch_seed, quantized_bytes_as_parameters
from models.config import LlamaConfig
from models.quantized import NF4Linear, QuantizedLinear
from tests.lora_models import tiny_lora_model
from tests.tolerances import assert_close


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_and_fsdp_need_torchrun(monkeypatch, strategy):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InputError, match=f"--distributed {strategy}: start the run with torchrun"):
        Parallel.start(strategy, "cpu", 60)
    assert Parallel.start("auto", "cpu", 60).strategy == "single"


def test_each_rank_takes_its_run_of_the_step_in_global_order():
    step = list(range(6))  # grad_accum 3 on 2 ranks
    shares = [Parallel("ddp", torch.device("cpu"), rank=r, world=2).window(step) for r in range(2)]
    assert shares == [[0, 1, 2], [3, 4, 5]]
    assert Parallel.single(torch.device("cpu")).window(step) == step


def test_micro_batch_seeds_depend_on_the_batch_alone():
    seeds = {micro_batch_seed(7, epoch, index) for epoch in range(3) for index in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**63 for s in seeds)
    assert micro_batch_seed(7, 1, 5) == micro_batch_seed(7, 1, 5) != micro_batch_seed(8, 1, 5)


def test_nf4_bytes_become_frozen_parameters_and_compute_the_same():
    """What FSDP2 shards: the packed codes and absmax as frozen parameters; the output is unchanged."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tiny_lora_model(cfg, quant="nf4", dropout=0.0).eval()
    x = torch.randint(0, 64, (1, 12))
    before = model(x)
    held_before, total_before = local_frozen_bytes(model)
    turned = quantized_bytes_as_parameters(model)
    linears = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert turned == 3 * len(linears) > 0  # packed, absmax, nested absmax of each
    for m in linears:
        assert {n for n, _ in m.named_parameters()} >= {"weight_packed", "weight_absmax", "weight_nested_absmax"}
        assert not any(p.requires_grad for p in m.parameters())
        # FSDP2 before torch 2.13 (the GPU machine has 2.11) makes each sharded parameter require a
        # gradient before freezing it, which an integer tensor cannot: the bytes are held as e4m3
        assert all(p.is_floating_point() for p in m.parameters())
        assert m.weight_packed.dtype == torch.float8_e4m3fn and m.weight_nf4.packed.dtype == torch.uint8
        assert "weight_quant_map" in dict(m.named_buffers())  # the code books stay replicated buffers
    assert local_frozen_bytes(model) == (held_before, total_before) == (total_before, total_before)
    assert_close(model(x), before, torch.float32, name="logits")


@pytest.mark.parametrize("fmt, sharded", [("int8", {"weight_codes", "weight_absmax"}),
                                          ("fp8", {"weight_codes", "weight_scale"})])
def test_int8_and_fp8_bytes_become_frozen_parameters_and_compute_the_same(fmt, sharded):
    """FSDP2 shards an int8 or FP8 base as its own bytes (codes and row scales), never dequantized."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tiny_lora_model(cfg, quant=fmt, dropout=0.0).eval()
    x = torch.randint(0, 64, (1, 12))
    before = model(x)
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 2 * 7 and quantized_bytes_as_parameters(model) == 2 * len(linears)
    for m in linears:
        assert {n for n, _ in m.named_parameters()} >= sharded and not any(p.requires_grad for p in m.parameters())
        assert m.weight_codes.element_size() == 1 and all(p.is_floating_point() for p in m.parameters())
        assert m.frozen_weight.codes.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
    assert_close(model(x), before, torch.float32, name="logits")


@pytest.mark.parametrize("quant", ["none", "nf4", "int8", "fp8"])
def test_lora_gradients_scale_exactly_with_the_loss(quant):
    """DDP and FSDP2 average gradients, so each rank scales its loss by the world size before the
    backward (`Parallel.backward`); N ranks give one process's step only if every gradient of a
    loss 2ᵏ·L is exactly 2ᵏ times that of L, bit for bit, in every base format. (FP8's row
    quantizer once broke this: a scale floor of 1e-12 put rows of tiny gradients on another grid;
    tests/kernels/test_fp8_rows.py checks the kernel's rows at any power-of-two scale.)"""

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tiny_lora_model(cfg, quant=quant, dropout=0.1)
    x = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = []
    for factor in (1.0, 2.0, 8.0):
        model.zero_grad()
        torch.manual_seed(5)  # the same dropout masks
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="sum") / 4096
        (loss * factor).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 * 2 * 7
    for factor, scaled in zip((2.0, 8.0), grads[1:]):
        for name, g in grads[0].items():
            assert torch.equal(scaled[name], g * factor), f"{quant} {name}: x{factor:g} is not exact"


@pytest.mark.parametrize("batching", ["padded", "padding-free", "pack"])
def test_a_loader_collates_one_batch_alone_as_in_its_epoch(batching):
    """What a rank collates of a step (`BatchLoader.batch`) is that batch of the epoch's sequence."""
    from engine.data.batching import BatchLoader
    from engine.data.samples import Sample

    samples = [Sample(list(range(3, 3 + n)), list(range(3, 3 + n)), f"s:{n}") for n in (5, 9, 3, 12, 7, 4, 8)]
    loader = BatchLoader(samples, 2, pad_id=0, seed=1, batching=batching, max_len=16)
    for epoch in (0, 1):
        for index, expected in enumerate(loader.batches(epoch)):
            alone = loader.batch(epoch, index)
            assert (alone.epoch, alone.index, alone.sample_ids) == (epoch, index, expected.sample_ids)
            assert torch.equal(alone.input_ids, expected.input_ids) and torch.equal(alone.labels, expected.labels)


@pytest.mark.parametrize("n_batches, world", [(7, 3), (6, 3), (2, 4), (5, 1)])
def test_the_ranks_share_an_evaluation_in_equal_rounds(n_batches, world):
    """Each batch is counted by exactly one rank; every rank runs ⌈n / N⌉ forwards (FSDP2 needs it)."""
    from engine.run.distributed import evaluation_share

    shares = [list(evaluation_share(Parallel("ddp", torch.device("cpu"), rank=r, world=world), n_batches))
              for r in range(world)]
    assert all(len(share) == -(-n_batches // world) for share in shares)
    counted = sorted(index for share in shares for index, counted in share if counted)
    assert counted == list(range(n_batches))
    assert list(evaluation_share(None, n_batches)) == [(i, True) for i in range(n_batches)]


def test_ddp_refuses_a_model_whose_weights_exceed_one_gpu():
    """Llama-2-70B in bf16 (138 GB) cannot be a DDP replica on an 80 GiB GPU; in NF4 (~36 GB) it can."""
    from engine.run.distributed import check_replica_fits, replica_bytes
    from models.presets import PRESETS

    config = PRESETS["llama2-70b"].config
    bf16 = replica_bytes(config, torch.bfloat16, "none")
    assert bf16 == 2 * 68_976_648_192  # every parameter in bf16
    nf4 = replica_bytes(config, torch.bfloat16, "nf4")
    assert 0.25 * bf16 < nf4 < 0.3 * bf16
    with pytest.raises(InputError, match=r"exceed this GPU's 80.0 GiB: use --distributed fsdp"):
        check_replica_fits(config, torch.bfloat16, "none", 80 * 2**30)
    check_replica_fits(config, torch.bfloat16, "nf4", 80 * 2**30)


def test_a_resume_with_other_micro_batches_per_step_says_they_count_over_all_ranks():
    from engine.run.fingerprint import compare_identity

    mismatches, notes = compare_identity({"grad_accum": 4}, {"grad_accum": 2})
    assert mismatches == ["grad_accum: checkpoint 4, now 2 (micro-batches per step over all ranks: --grad-accum × "
                          "the number of ranks)"] and notes == []
