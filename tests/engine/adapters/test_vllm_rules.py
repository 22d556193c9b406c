"""`engine.adapters.vllm_rules`: one test per rule, ``python -m engine.merge --check-vllm`` (exit 0 / 1),
and the verdict line at the end of ``python -m engine.train``."""

import json
from pathlib import Path

import pytest

from engine.adapters import LoRAConfig, inject_lora, save_adapter
from engine.adapters.vllm_rules import check_vllm, vllm_lora_problems, vllm_verdict
from engine.errors import run_cli
from engine.merge import main
from models.loading import load_model
from tests.engine.conftest import write_hf_llama

ROOT = Path(__file__).resolve().parents[3]
LAYER = "base_model.model.model.layers.0"


def shapes(r=8, modules=("self_attn.q_proj", "self_attn.v_proj"), hidden=64):
    out = {}
    for m in modules:
        out[f"{LAYER}.{m}.lora_A.weight"] = (r, hidden)
        out[f"{LAYER}.{m}.lora_B.weight"] = (hidden, r)
    return out


def config(**fields):
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **fields}


def test_plain_adapter_is_servable_at_default_rank():
    v = vllm_verdict(config(), shapes())
    assert v.servable and v.max_lora_rank == 8 and v.problems == []
    assert v.summary() == "vLLM can serve it as LoRA (--enable-lora)"


@pytest.mark.parametrize("rank,flag", [(1, 8), (16, 16), (17, 32), (300, 320), (512, 512)])
def test_rank_names_the_smallest_max_lora_rank(rank, flag):
    v = vllm_verdict(config(r=rank), shapes(r=rank))
    assert v.servable and v.max_lora_rank == flag
    assert (f"--max-lora-rank {flag}" in v.summary()) == (flag > 16)


def test_rank_above_512_is_refused():
    problems = vllm_lora_problems(config(r=640), shapes(r=640))
    assert len(problems) == 1 and "512" in problems[0]


def test_rank_pattern_raising_a_module_rank_sets_the_flag():
    """vLLM sizes every slot at --max-lora-rank: the largest module rank counts, not r."""
    s = shapes(r=8) | shapes(r=64, modules=("self_attn.k_proj",))
    v = vllm_verdict(config(rank_pattern={"k_proj": 64}, alpha_pattern={"k_proj": 128}), s)
    assert v.servable and v.max_lora_rank == 64


def test_patterns_with_another_scale_are_a_problem():
    """vLLM applies alpha/r to every module; a pattern-given scale of 1 vs 2 would be served wrong."""
    s = shapes(r=8) | shapes(r=16, modules=("self_attn.k_proj",))
    problems = vllm_lora_problems(config(rank_pattern={"k_proj": 16}), s)
    assert len(problems) == 1 and "k_proj" in problems[0] and "lora_B" in problems[0]
    assert "another scale" in vllm_lora_problems(config(alpha_pattern={"q_proj": 8}), shapes())[0]


def test_rslora_is_fine_and_noted():
    v = vllm_verdict(config(use_rslora=True), shapes())
    assert v.servable and "rsLoRA" in v.summary()


@pytest.mark.parametrize("fields,words", [
    ({"use_dora": True}, "DoRA"), ({"modules_to_save": ["score"]}, "modules_to_save"),
    ({"bias": "all"}, "biases"), ({"lora_bias": True}, "biases"), ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, "LoRA adapters only"), ({"r": 0}, "'r'")])
def test_unsupported_features_are_problems(fields, words):
    problems = vllm_lora_problems(config(**fields), shapes())
    assert problems and words in problems[0], problems


def test_modules_other_than_llamas_are_refused_and_lm_head_noted():
    problems = vllm_lora_problems(config(), shapes(modules=("self_attn.q_proj", "self_attn.rotary")))
    assert len(problems) == 1 and "rotary" in problems[0]
    s = shapes() | {"base_model.model.lm_head.lora_A.weight": (8, 64),
                    "base_model.model.lm_head.lora_B.weight": (97, 8)}
    v = vllm_verdict(config(), s)
    assert v.servable and "lm_head" in v.summary()


def test_other_tensors_are_refused():
    s = shapes() | {f"{LAYER}.self_attn.q_proj.lora_magnitude_vector": (64,)}
    assert "not LoRA A/B" in vllm_lora_problems(config(), s)[0]
    assert "no LoRA weights" in vllm_lora_problems(config(), {})[0]


def test_several_problems_summary_counts_them():
    v = vllm_verdict(config(use_dora=True, modules_to_save=["score"]), shapes())
    assert not v.servable and "and 1 more" in v.summary()


# ----------------------------------------------------------------------------- on folders

@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    base = write_hf_llama(root / "base", tie_word_embeddings=False)
    cfg = LoRAConfig(r=32, alpha=16, target_modules=("q_proj", "down_proj"))
    model = load_model(base)
    inject_lora(model, cfg)
    save_adapter(model, cfg, root / "adapter", str(base))
    return root / "adapter"


def cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_check_vllm_cli_exit_codes(adapter, tmp_path, capsys):
    assert check_vllm(adapter).max_lora_rank == 32
    code, out, _ = cli(["--check-vllm", "--adapter", str(adapter)], capsys)
    assert code == 0 and out.strip() == "vLLM can serve it as LoRA (--enable-lora --max-lora-rank 32)"
    dora = tmp_path / "dora"
    dora.mkdir()
    config_json = json.loads((adapter / "adapter_config.json").read_text()) | {"use_dora": True}
    (dora / "adapter_config.json").write_text(json.dumps(config_json))
    (dora / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    code, out, _ = cli(["--check-vllm", "--adapter", str(dora)], capsys)
    assert code == 1 and "DoRA" in out
    code, _, err = cli(["--check-vllm", "--adapter", str(tmp_path / "missing")], capsys)
    assert code == 2 and "adapter_config.json" in err


def test_train_prints_the_verdict(tiny_model_dir, tmp_path, capsys):
    from engine.train import main as train_main

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((ROOT / "examples" / "license_qa.jsonl").read_text().splitlines()[:4]) + "\n")
    assert train_main(["--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "run"),
                       "--max-steps", "1", "--batch-size", "2", "--max-len", "128", "--lora-r", "4"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-2:]
    assert last[0].startswith("adapter written to ") and last[1] == "serving: vLLM can serve it as LoRA (--enable-lora)"
