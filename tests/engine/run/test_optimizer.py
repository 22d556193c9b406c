"""`engine.run.optimizer`: parameter groups with their own rate (LoRA+: B at ratio x A's), the
schedule applied per group, and AdamW's state through a checkpoint with groups."""

import pytest
import torch
from torch import nn

from engine.adapters import LoRAConfig, adapter_params, inject_lora, set_trainable
from engine.adapters.score_head import ScoreHead, attach_score_head
from engine.run.checkpoint import load_optimizer_tensors, optimizer_tensors
from engine.run.optimizer import Optimizer, param_groups
from tests.tolerances import assert_close


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.v_proj = nn.Linear(12, 8), nn.Linear(8, 12)


def lora_model(head: bool = False) -> nn.Module:
    model = Tiny()
    torch.manual_seed(1)
    inject_lora(model, LoRAConfig(r=3, alpha=6, dropout=0.0, target_modules=("q_proj", "v_proj")))
    if head:
        attach_score_head(model, ScoreHead(torch.randn(1, 12)))
    set_trainable(model)
    return model


def optimizer(model, ratio, lr=1e-2, schedule="constant"):
    return Optimizer(param_groups(model, ratio), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                     max_grad_norm=0.0, schedule=schedule, warmup=0, total_steps=10)


def test_groups_put_every_lora_b_apart_and_everything_else_at_the_base_rate():
    model = lora_model(head=True)
    named = adapter_params(model)
    (one,) = param_groups(model, None)
    assert one["lr_scale"] == 1.0 and [id(p) for p in one["params"]] == [id(p) for p in named.values()]
    base, b = param_groups(model, 16.0)
    assert b["lr_scale"] == 16.0
    assert {id(p) for p in b["params"]} == {id(named[n]) for n in named if n.endswith("lora_B")}
    assert {id(p) for p in base["params"]} == {id(named[n]) for n in named if not n.endswith("lora_B")}
    assert any(p is model.score.weight for p in base["params"])  # the reward head keeps the base rate


@pytest.mark.parametrize("ratio", [None, 16.0, 2.5])
def test_one_step_moves_b_ratio_times_as_far_as_a(ratio):
    """With the same gradient g on every element, AdamW's first step is -lr * g / (|g| + eps) (both
    moments bias-corrected): B's step must be exactly ratio times A's, and the groups' lr the
    scheduled rate times their scale."""
    model = lora_model()
    opt = optimizer(model, ratio, schedule="cosine")
    named = adapter_params(model)
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.full_like(p, 0.3)
    update = opt.step(torch.tensor(1.0), step=4)
    scale = 1.0 if ratio is None else ratio
    assert sorted(g["lr"] for g in opt.adamw.param_groups) == sorted({update.lr, update.lr * scale})
    expected = -update.lr * 0.3 / (0.3 + 1e-8)
    for n, p in named.items():
        step = p.detach() - before[n]
        want = torch.full_like(step, expected * (scale if n.endswith("lora_B") else 1.0))
        assert_close(step, want, name=f"step of {n}", rtol=1e-4, atol=1e-9)


def test_checkpointed_state_resumes_the_same_steps_with_groups():
    """AdamW's state saved by name (`optimizer_tensors`) and loaded into a fresh grouped optimizer:
    the next steps equal the uninterrupted ones bitwise."""
    def grads(model, k):
        g = torch.Generator().manual_seed(k)
        for p in adapter_params(model).values():
            p.grad = torch.randn(p.shape, generator=g)

    model = lora_model()
    opt = optimizer(model, 8.0)
    for k in range(2):
        grads(model, k)
        opt.step(1.0, k)
    saved = {k: v.clone() for k, v in optimizer_tensors(model, opt.adamw).items()}  # on a CPU: views of the state
    weights = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    for k in range(2, 4):
        grads(model, k)
        opt.step(1.0, k)

    again = lora_model()
    with torch.no_grad():
        for n, p in adapter_params(again).items():
            p.copy_(weights[n])
    opt2 = optimizer(again, 8.0)
    load_optimizer_tensors(again, opt2.adamw, saved, where=None)
    for k in range(2, 4):
        grads(again, k)
        opt2.step(1.0, k)
    for (n, p), q in zip(adapter_params(model).items(), adapter_params(again).values()):
        assert torch.equal(p, q), n


def test_a_plain_parameter_list_is_one_group_at_the_base_rate():
    model = lora_model()
    opt = Optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, max_grad_norm=1.0, schedule="constant", warmup=0, total_steps=3)
    for p in opt.params:
        p.grad = torch.ones_like(p)
    assert opt.step(1.0, 0).lr == 1e-3 and [g["lr"] for g in opt.adamw.param_groups] == [1e-3]
