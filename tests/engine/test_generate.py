"""Generation: KV-cache decoding equals recomputing the full sequence, sampling, streaming, the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.generate import TextStream, generate, sample_next
from models.config import LlamaConfig
from tools.random_checkpoint import random_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=6)
    model = random_model(cfg, seed=3)
    with torch.no_grad():  # larger logits than the 0.02 init, so greedy choices are not ties
        model.lm_head.weight.mul_(50)
    return model


@torch.no_grad()
def full_forward_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_with_cache_equals_full_recompute(tiny):
    prompt = [3, 17, 5, 42, 8]
    out = list(generate(tiny, prompt, max_new_tokens=12))
    assert len(out) == 12 and out == full_forward_greedy(tiny, prompt, 12)  # crosses the window of 6


def test_stops_at_any_eos(tiny):
    prompt = [3, 17, 5, 42, 8]
    free = list(generate(tiny, prompt, max_new_tokens=12))
    stop = free[4]
    out = list(generate(tiny, prompt, max_new_tokens=12, eos_token_ids=(49, stop)))
    assert out == free[:free.index(stop) + 1]


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(tiny):
    prompt = torch.tensor([[1, 2, 3]])

    def sample(seed, **kw):
        return list(generate(tiny, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw))

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(0, top_p=1e-6) == list(generate(tiny, prompt, 10))


def test_sample_next_respects_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.75, g) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.75 needs the second token; 0.8 >= 0.75 stops there
    assert sample_next(logits, 0.0, 0.1, g) == 0


class ByteTokenizer:
    """A test double: one token per UTF-8 byte, undecodable tails shown as U+FFFD like tokenizers."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_never_prints_half_a_character():
    text = "né 🌊!"
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in text.encode("utf-8")]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("ENGINE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "engine.generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_model_is_one_line(tmp_path):
    result = run_cli("--model", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "no config.json" in result.stderr and str(tmp_path) in result.stderr


def test_cli_chat_answers_paris(smollm2_dir):
    result = run_cli("--model", str(smollm2_dir), "--chat", "--prompt", "What is the capital of France?",
                     "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout, result.stdout


def test_generate_with_an_adapter_equals_the_merged_folder(smollm2_dir, tmp_path):
    """``generate --adapter DIR`` on the base gives, greedily, the very tokens of the folder that
    ``engine.merge`` writes from that adapter (fp32, the real SmolLM2 weights, an adapter that
    changes the answer)."""
    from engine.adapters import LoRAConfig, adapter_params, inject_lora, save_adapter
    from engine.errors import run_cli
    from engine.merge import main as merge_main
    from models import load_model

    model = load_model(smollm2_dir)
    torch.manual_seed(0)
    inject_lora(model, LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj")))
    with torch.no_grad():
        for name, p in adapter_params(model).items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    adapter = save_adapter(model, LoRAConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj")),
                           tmp_path / "adapter", str(smollm2_dir))
    merged = tmp_path / "merged"
    with pytest.raises(SystemExit) as done:
        run_cli(merge_main, ["--model", str(smollm2_dir), "--adapter", str(adapter), "--out", str(merged),
                             "--dtype", "fp32"])
    assert done.value.code == 0

    def tokens(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "engine.generate", "--prompt", "The capital of France is",
                                 "--max-new-tokens", "16", *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    with_adapter = tokens("--model", str(smollm2_dir), "--adapter", str(adapter))
    assert with_adapter == tokens("--model", str(merged))
    assert with_adapter != tokens("--model", str(smollm2_dir))  # the adapter changes the answer
