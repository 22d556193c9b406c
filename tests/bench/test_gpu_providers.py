"""The providers the kernel benches add on a GPU only (ours, in Triton), called here on CPU tensors
in the Triton interpreter, at one small shape each: they give the ``torch`` provider's output and
gradients (fp32 table), so a wrongly wired provider is found before a lent GPU's minutes are spent."""

import torch

from bench import bench_fp8_rows, bench_int8, bench_lora, bench_lora_gather, bench_lora_group, bench_nf4
from kernels.backend import force_triton
from kernels.fp8 import quantize_fp8
from tests.tolerances import assert_close


def _tensors(result) -> list[torch.Tensor]:
    """A provider's output(s), FP8 codes as their bytes (torch.equal does not compare e4m3)."""
    results = result if isinstance(result, tuple) else (result,)
    return [t.view(torch.uint8) if t.dtype.itemsize == 1 else t for t in results]


def test_dequantizers_and_the_row_quantizer_give_the_torch_providers_bytes():
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    found = {"nf4": bench_nf4.providers(weight, 64, True, torch.float32, "cuda"),
             "int8": bench_int8.providers(weight, torch.float32, "cuda"),
             "fp8_rows": bench_fp8_rows.providers(weight * 50, torch.rand(128) + 0.5, "cuda")}
    for name, providers in found.items():
        expected, got = _tensors(providers["torch"]()), _tensors(providers["ours"]())
        assert len(got) == len(expected) and all(torch.equal(g, e) for g, e in zip(got, expected)), name


def _full(fn, make_inputs) -> list[torch.Tensor]:
    """fn's output and its gradients for every input of ``make_inputs()``, under force_triton (what
    the GPU's auto mode picks)."""
    inputs = make_inputs()
    with force_triton():
        y = fn(*inputs.args)
        return [y.detach(), *torch.autograd.grad(y, inputs.wrt, inputs.grad_out)]


def _assert_same(got: list[torch.Tensor], expected: list[torch.Tensor], name: str) -> None:
    assert len(got) == len(expected), name
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, torch.float32, f"{name} output" if i == 0 else f"{name} grad {i}")


def test_lora_linear_providers_give_the_torch_providers_output_and_gradients():
    for nf4 in (False, True):
        weight = bench_lora.make_weight(48, 64, torch.float32, "cpu", nf4)
        providers = bench_lora.providers("cuda", 2.0, 0.0)
        make = lambda: bench_lora.make_inputs(16, weight, 48, 64, 4, torch.float32, "cpu")  # noqa: E731
        _assert_same(_full(providers["ours"], make), _full(providers["torch"], make), f"lora nf4={nf4}")


def test_lora_group_providers_give_the_torch_providers_output_and_gradients():
    dense = [bench_lora.make_weight(n, 64, torch.float32, "cpu", False) for n in (32, 16, 16)]
    for base, weights in {"dense": dense, "fp8": [quantize_fp8(w) for w in dense]}.items():
        providers = bench_lora_group.providers("cuda", weights, 2.0, 0.0)
        make = lambda: bench_lora_group.make_inputs(8, weights, 64, 4, torch.float32, "cpu")  # noqa: E731
        expected = _full(providers["torch"], make)
        for name in ("separate", "grouped"):
            _assert_same(_full(providers[name], make), expected, f"lora_group {base} {name}")


def test_lora_gather_provider_gives_the_torch_loops_output():
    inputs = bench_lora_gather.make_inputs(24, 48, 32, 3, 4, torch.float32, "cpu")
    with force_triton():
        got = bench_lora_gather.triton_gather(*inputs.args)
    assert_close(got, bench_lora_gather.torch_loop(*inputs.args), torch.float32, "lora_gather")
