"""The one way in (`engine.adapters.methods`): --peft and its flags checked, an adapter folder's
method found from its config, the run fingerprint records the method's settings."""

import json

import pytest

from engine.adapters.methods import folder_method, method_named
from engine.cli import parse_config
from engine.errors import InputError
from engine.run.fingerprint import method_fields

BASE = ["--model", "m", "--data", "d"]


@pytest.mark.parametrize("argv, message", [
    (["--peft", "ia3", "--lora-init", "pissa"], "--lora-init applies to --peft lora or dora, not ia3"),
    (["--peft", "prefix", "--loraplus-ratio", "16"], "--loraplus-ratio applies to --peft lora or dora, not prefix"),
    (["--lora-init", "loftq"], "loftq .* needs --quant nf4"),
    (["--peft", "dora", "--lora-init", "pissa"], "with --peft dora use default or gaussian"),
    (["--lora-init", "olora", "--init-adapter", "a"], "--lora-init olora initialises a fresh adapter"),
    (["--method", "reward", "--peft", "ia3"], "--method reward saves its score head beside a LoRA, DoRA or bottleneck"),
    (["--peft", "prefix", "--offload-activations"], "--offload-activations does not take --peft prefix"),
    (["--num-virtual-tokens", "0"], "--num-virtual-tokens: expected a value >= 1, got 0"),
])
def test_bad_method_flags_name_the_flag(argv, message):
    with pytest.raises(InputError, match=message):
        parse_config(BASE + argv)


def test_unknown_method_name():
    with pytest.raises(InputError, match="--peft 'vera': expected one of lora"):
        method_named("vera")


@pytest.mark.parametrize("contents, message", [
    ('{"peft_type": "VERA"}', "peft_type 'VERA' is not a method we train or load"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_folder_of_an_unknown_method_names_the_file(tmp_path, contents, message):
    (tmp_path / "adapter_config.json").write_text(contents)
    with pytest.raises(InputError, match=message) as err:
        folder_method(tmp_path)
    assert "adapter_config.json" in str(err.value)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(InputError, match="adapter folder not found"):
        folder_method(tmp_path / "nowhere")
    with pytest.raises(InputError, match="adapter_config.json: not found"):
        folder_method(tmp_path)


def test_a_lora_folder_is_lora(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert folder_method(tmp_path).name == "lora"


def test_fingerprint_records_only_what_differs_from_plain_lora():
    assert method_fields(parse_config(BASE)) == {}
    assert method_fields(parse_config(BASE + ["--peft", "prefix", "--num-virtual-tokens", "8"])) == {
        "peft": "prefix", "num_virtual_tokens": 8, "prefix_projection": False}
    assert method_fields(parse_config(BASE + ["--peft", "bottleneck", "--adapter-dim", "16"])) == {
        "peft": "bottleneck", "adapter_dim": 16, "adapter_placement": "houlsby"}
    assert method_fields(parse_config(BASE + ["--lora-init", "pissa", "--loraplus-ratio", "16"])) == {
        "lora_init": "pissa", "loraplus_ratio": 16}
    # a starting adapter brings its own method: only LoRA+ still counts
    assert method_fields(parse_config(BASE + ["--peft", "ia3", "--init-adapter", "a"])) == {}
