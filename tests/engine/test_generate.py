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


# ----------------------------------------------------------------------------- several adapters, one batch

ADAPTER_CONFIGS = {  # different ranks and targets, a rank/alpha pattern, rsLoRA
    "a": dict(r=4, alpha=8, target_modules="all-linear"),
    "b": dict(r=8, alpha=5, target_modules=("q_proj", "v_proj", "down_proj"), use_rslora=True),
    "c": dict(r=2, alpha=4, target_modules=("o_proj", "up_proj"), rank_pattern={"up_proj": 6}),
}


def save_random_adapter(model, out, seed, **config):
    """A copy of ``model`` with a LoRA of non-zero A and B (B ~ 0.3 N(0, 1)), saved in PEFT format."""
    import copy

    from engine.adapters import LoRAConfig, save_adapter
    from tests.engine.conftest import inject_random_lora

    model = copy.deepcopy(model)
    cfg = LoRAConfig(**config)
    inject_random_lora(model, cfg, seed, 0.3)
    return save_adapter(model, cfg, out, None)


def test_mixed_adapter_batch_equals_each_prompt_alone(tiny, tmp_path):
    """Five prompts of different lengths (left-padded, crossing the sliding window), rows on adapters
    a, b, c of different ranks and targets and on the base, in ONE greedy batch: every row's tokens
    are those `generate` gives for its prompt alone with only its adapter loaded."""
    import copy

    from engine.adapters import load_adapter, read_adapter
    from engine.adapters.multi import inject_adapters
    from engine.sampling import sample_completions

    paths = {name: save_random_adapter(tiny, tmp_path / name, seed, **cfg)
             for seed, (name, cfg) in enumerate(ADAPTER_CONFIGS.items(), start=1)}
    prompts = [[3, 17, 5, 42, 8], [1, 2], [9, 9, 9, 9, 9, 9, 9, 9], [4, 30, 2], [7], [11, 12, 13, 14]]
    rows = ["a", "none", "b", "c", "a", "b"]
    model = copy.deepcopy(tiny)
    multi = inject_adapters(model, [read_adapter(paths[n], name=n) for n in ("a", "b", "c")])
    with multi.selected(rows):
        batch = sample_completions(model, prompts, max_new_tokens=10, temperature=0.0, top_p=1.0, eos_token_ids=(),
                                   generator=None, pad_id=0)
    changed = 0
    for prompt, name, got in zip(prompts, rows, batch):
        alone = copy.deepcopy(tiny)
        if name != "none":
            load_adapter(alone, paths[name])
        assert got == list(generate(alone, prompt, 10)), (name, prompt)
        changed += name != "none" and got != list(generate(tiny, prompt, 10))
    assert changed >= 2, "the adapters should change some greedy continuations"


def run_generate(argv, capsys):
    from engine.errors import run_cli as run_engine_cli
    from engine.generate import main

    with pytest.raises(SystemExit) as done:
        run_engine_cli(main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


def test_cli_several_adapters_one_batch(tiny_model_dir, tmp_path, capsys):
    """--adapter x=DIR and a plain DIR (named by its folder), --prompt/--prompt-adapter pairs and a
    --prompts file with none: one JSON line per prompt, each the text of that prompt generated
    alone (the single-prompt path, streamed) with its adapter."""
    import json

    from models import load_model

    base = load_model(tiny_model_dir)
    x = save_random_adapter(base, tmp_path / "x_dir", 1, **ADAPTER_CONFIGS["a"])
    y = save_random_adapter(base, tmp_path / "y", 2, **ADAPTER_CONFIGS["b"])
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "Once upon a time", "adapter": "y"}\n\n{"prompt": "Hi", "adapter": "none"}\n')
    common = ["--model", tiny_model_dir, "--max-new-tokens", "6"]
    code, out, err = run_generate(common + ["--adapter", f"x={x}", "--adapter", y, "--prompt", "The capital of",
                                            "--prompt-adapter", "x", "--prompt", "hello", "--prompt-adapter", "y",
                                            "--prompts", prompts_file], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(r["index"], r["adapter"], r["prompt"]) for r in lines] == [
        (0, "x", "The capital of"), (1, "y", "hello"), (2, "y", "Once upon a time"), (3, "none", "Hi")]
    folders = {"x": x, "y": y}
    for r in lines:
        adapter = [] if r["adapter"] == "none" else ["--adapter", folders[r["adapter"]]]
        code, alone, err = run_generate(common + adapter + ["--prompt", r["prompt"]], capsys)
        assert code == 0, err
        assert alone == r["text"] + "\n", r


@pytest.mark.parametrize("flags,message", [
    (["--adapter", "a b=dir", "--prompt", "hi"], "is not an adapter name"),
    (["--adapter", "x=d1", "--adapter", "x=d2", "--prompt", "hi", "--prompt-adapter", "x"], "'x' is given twice"),
    (["--adapter", "x=d1", "--adapter", "y=d2", "--prompt", "hi"], "say which one each prompt uses"),
    (["--adapter", "x=d1", "--prompt", "hi", "--prompt-adapter", "zz"], "unknown adapter 'zz'"),
    (["--adapter", "x=d1", "--prompt", "a", "--prompt", "b", "--prompt-adapter", "x"], "given 1 times for 2"),
    (["--adapter", "none=d1", "--prompt", "hi"], "is the base"),
    (["--max-new-tokens", "2"], "no prompt"),
])
def test_cli_bad_adapter_flags_exit_2(flags, message, tmp_path, capsys):
    code, _, err = run_generate(["--model", tmp_path / "never-read", *flags], capsys)
    assert code == 2 and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "a"}\n{"prompt": \n', "p.jsonl:2"),
    ('{"prompt": "a"}\n\n{"text": "b"}\n', 'p.jsonl:3: expected {"prompt"'),
    ('{"prompt": "a", "adapter": 3}\n', 'p.jsonl:1: "adapter" must be a name'),
])
def test_cli_bad_prompts_file_exit_2(text, message, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text(text)
    code, _, err = run_generate(["--model", tmp_path / "never-read", "--prompts", tmp_path / "p.jsonl"], capsys)
    assert code == 2 and message in err, err


def test_cli_batch_refuses_an_adapter_of_another_shape(tiny, tiny_model_dir, tmp_path, capsys):
    """An adapter made for another base stops the batch with status 2 and its shape, before any output."""
    wrong = save_random_adapter(tiny, tmp_path / "wrong", 1, **ADAPTER_CONFIGS["a"])  # intermediate 48, not 64
    code, out, err = run_generate(["--model", tiny_model_dir, "--adapter", f"w={wrong}", "--prompt", "a",
                                   "--prompt", "b", "--max-new-tokens", "2"], capsys)
    assert code == 2 and "has shape" in err and "expected" in err, err
    assert out == ""
