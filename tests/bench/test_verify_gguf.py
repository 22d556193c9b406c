"""Our GGUF files in llama.cpp itself (llama-cpp-python; skipped where it is not installed): a tiny
random model exported as F32 gives our logits to fp32 accuracy, alone and with a LoRA GGUF on top,
and llama.cpp's tokenizer read from the file gives our ids."""

from pathlib import Path

import pytest
import torch

import models
from bench.verify_gguf import PROMPTS, compare, read_back
from engine.adapters import load_adapter
from engine.export import export_lora, export_model
from tests.engine.test_export import _adapter, _config, _write_model

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_llama_cpp_logits_match_ours(tmp_path, smollm2_dir, tie):
    folder = _write_model(tmp_path / "m", _config(tie), Path(smollm2_dir))
    adapter = _adapter(folder, tmp_path / "a", 7, use_rslora=True, rank_pattern={"down_proj": 2})
    tok = models.load_tokenizer(folder)
    base = models.load_model(folder).eval()
    adapted = models.load_model(folder)
    load_adapter(adapted, adapter)
    adapted.eval()
    export_model(str(folder), [], tmp_path / "m.gguf", "f32")
    export_lora(str(folder), str(adapter), tmp_path / "a.gguf", "f32")
    export_model(str(folder), [str(adapter)], tmp_path / "merged.gguf", "f16")
    rows = [
        compare(llama_cpp, tmp_path / "m.gguf", "F32", "base", base, base, tok, PROMPTS, 8),
        compare(llama_cpp, tmp_path / "m.gguf", "F32 + LoRA", "adapted", adapted, adapted, tok, PROMPTS, 8,
                lora=tmp_path / "a.gguf"),
        compare(llama_cpp, tmp_path / "merged.gguf", "merged F16", "adapted", adapted,
                read_back(tmp_path / "merged.gguf", tmp_path), tok, PROMPTS, 8),
    ]
    for row in rows:
        assert row.tokenizer_identical == row.prompts, row
        assert row.max_abs_logit > 1, row  # logits large enough for the tolerances to mean something
    assert rows[0].max_abs_logit_diff < 1e-3 and rows[1].max_abs_logit_diff < 1e-3, rows[:2]
    assert rows[0].greedy_identical == rows[1].greedy_identical == len(PROMPTS), rows[:2]
    # F16: llama.cpp's CPU matmuls round the activations to F16 as well (a few ulp of F16, 2**-11,
    # of the logits' scale), against our model on the file's own weights
    assert rows[2].max_abs_logit_diff_vs_file < 5e-3 * rows[2].max_abs_logit, rows[2]
    # (no greedy check for F16: a random model's near-tied logits let F16 rounding flip an argmax)
    assert torch.is_grad_enabled()  # compare() leaves autograd as it found it
