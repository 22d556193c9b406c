"""The model with its fused kernels switched on equals the model on the reference ops (SmolLM2).

"On" forces the Triton kernels (RMSNorm, RoPE, SwiGLU in every block; the fused linear +
cross-entropy for the loss) — under the interpreter on a CPU, natively on a GPU; "off" runs the
plain-torch references, which `kernels.backend.use_reference()` selects everywhere (the A/B switch).
"""

import pytest
import torch

from kernels.backend import force_triton, use_reference
from kernels.linear_cross_entropy import linear_cross_entropy
from models import load_model, load_tokenizer
from tests.tolerances import LOGITS_FP32_ATOL, assert_close

PROMPTS = ["The capital of France is", "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def model_and_batch(smollm2_dir, device):
    model = load_model(smollm2_dir, device=device)
    tok = load_tokenizer(smollm2_dir)
    rows = [tok.encode(p) for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return model, ids.to(device), mask.to(device)


def logits_and_loss(model, ids, mask):
    hidden = model.hidden_states(ids, mask)  # (B, T, H)
    hidden.retain_grad()
    labels = torch.where(mask.bool(), ids, -100)[:, 1:].reshape(-1)
    # reduction="sum" keeps the gradient at magnitude ~1, where the table's absolute floor is meaningful
    loss = linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), model.lm_head.weight, labels,
                                reduction="sum")
    loss.backward()
    return model.lm_head(hidden).detach(), loss.detach(), hidden.grad


def test_fused_ops_equal_reference_on_smollm2(model_and_batch):
    model, ids, mask = model_and_batch
    with use_reference():
        ref_logits, ref_loss, ref_grad = logits_and_loss(model, ids, mask)
    with force_triton():
        logits, loss, grad = logits_and_loss(model, ids, mask)
    real = mask.bool()
    # 30 blocks of fp32 round-off in a different order: the model-level row of the table, for the
    # logits and for the gradient at the hidden state (a function of those logits through softmax).
    assert_close(logits[real], ref_logits[real], torch.float32, name="logits", atol=LOGITS_FP32_ATOL)
    assert_close(loss, ref_loss, torch.float32, name="loss")
    assert_close(grad, ref_grad, torch.float32, name="d loss / d hidden", atol=LOGITS_FP32_ATOL)
