"""TrainConfig's CLI: defaults < TOML file < flags, validation errors name the flag."""

import pytest

from engine.cli import parse_config
from engine.config import TrainConfig
from engine.errors import InputError


def test_toml_overrides_defaults_and_flags_override_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('lr = 1e-4\nlora-r = 8\npack = true\ntarget_modules = "q_proj,v_proj"\n')
    cfg = parse_config(["--config", str(toml), "--model", "m", "--data", "d.jsonl", "--lora-r", "32"])
    assert cfg.lr == 1e-4 and cfg.pack is True and cfg.target_modules == "q_proj,v_proj"
    assert cfg.lora_r == 32  # the flag wins over the file
    assert cfg.batch_size == TrainConfig.batch_size  # untouched default


def test_boolean_flags_forms():
    base = ["--model", "m", "--data", "d"]
    assert parse_config(base + ["--pack"]).pack is True
    assert parse_config(base + ["--pack", "false"]).pack is False
    assert parse_config(base + ["--no-pack"]).pack is False
    assert parse_config(base).pack is False


@pytest.mark.parametrize("argv, message", [
    (["--data", "d"], "--model is required"),
    (["--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size: expected a value >= 1, got 0"),
    (["--model", "m", "--data", "d", "--eval-split", "1.5"], "--eval-split"),
    (["--model", "m", "--data", "d", "--pack", "--batching", "padded"], "--pack and --batching padded disagree"),
    (["--model", "m", "--data", "d", "--batching", "pack", "--max-tokens-per-batch", "64"],
     "--max-tokens-per-batch applies to --batching padding-free, not pack"),
    (["--model", "m", "--data", "d", "--max-tokens-per-batch", "0"], "--max-tokens-per-batch: expected a value >= 1"),
    (["--model", "m", "--data", "d", "--offload-activations", "--no-grad-checkpointing"],
     "--offload-activations .* needs checkpointing"),
    (["--model", "m", "--data", "d", "--mlp-chunk-tokens", "0"], "--mlp-chunk-tokens: expected a value >= 1, got 0"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(InputError, match=message):
        parse_config(argv)


def test_batching_defaults_to_padding_free_and_pack_keeps_its_meaning():
    base = ["--model", "m", "--data", "d"]
    assert parse_config(base).batching == "padding-free"
    assert parse_config(base + ["--method", "dpo"]).batching == "padding-free"
    assert parse_config(base + ["--batching", "padded"]).batching == "padded"
    for argv in (["--pack"], ["--batching", "pack"], ["--pack", "--batching", "pack"]):
        cfg = parse_config(base + argv)
        assert (cfg.batching, cfg.pack) == ("pack", True)
    cfg = parse_config(base + ["--method", "dpo", "--pack"])  # no longer refused for DPO
    assert (cfg.method, cfg.batching) == ("dpo", "pack")
    assert parse_config(base + ["--max-tokens-per-batch", "512"]).max_tokens_per_batch == 512
    assert parse_config(base).mlp_chunk_tokens is None
    assert parse_config(base + ["--mlp-chunk-tokens", "8192"]).mlp_chunk_tokens == 8192
    assert TrainConfig(model="m", data="d").to_json()["batching"] == "padding-free"  # what config.json records


def test_unknown_toml_key_names_the_file(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("learning_rate = 1e-4\n")
    with pytest.raises(InputError, match=r"bad\.toml:1: unknown option 'learning_rate'"):
        parse_config(["--config", str(toml), "--model", "m", "--data", "d"])
