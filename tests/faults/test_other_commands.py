"""merge, eval and generate given bad input; broken adapters and model folders for every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.faults.conftest import cli, snapshot, train_args


@pytest.fixture
def adapter(finished_run, tmp_path) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(finished_run / "adapter", copy)
    return copy


def broken_adapter(adapter: Path, value: float = float("nan"), header: str | None = None) -> Path:
    """The adapter with one value of the first lora_B set to ``value`` (and its lineage header replaced)."""
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[name][0, 0] = value
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    if header is not None:
        metadata["lora_engine"] = header
    save_file(tensors, str(path), metadata=metadata)
    return adapter


# ---------------------------------------------------------------------------- merge

def test_merge_never_replaces_the_base_model(tiny_model_dir, adapter, capfd):
    before = snapshot(tiny_model_dir)
    result = cli("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", tiny_model_dir, "--overwrite", capfd=capfd)
    assert result.code == 2 and "is or holds the base model" in result.message
    assert snapshot(tiny_model_dir) == before


def test_merge_never_writes_over_the_adapter_or_foreign_files(tiny_model_dir, adapter, tmp_path, capfd):
    before = snapshot(adapter)
    result = cli("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", adapter, "--overwrite", capfd=capfd)
    assert result.code == 2 and "is or holds the adapter" in result.message
    assert snapshot(adapter) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_text("someone else's")
    result = cli("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", other, "--overwrite", capfd=capfd)
    assert result.code == 2 and "not written by engine.merge" in result.message
    assert (other / "weights.bin").read_text() == "someone else's"


def test_merge_replaces_its_own_folder_only_with_overwrite(tiny_model_dir, adapter, tmp_path, capfd):
    out = tmp_path / "merged"
    assert cli("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", out, capfd=capfd).code == 0
    assert (out / "merge.json").is_file()
    result = cli("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", out, capfd=capfd)
    assert result.code == 2 and "pass --overwrite" in result.message
    assert cli("merge", "--model", tiny_model_dir, "--adapter", adapter, "--out", out, "--overwrite", capfd=capfd).code == 0


# ---------------------------------------------------------------------------- broken adapters anywhere

@pytest.mark.parametrize("command", ["train", "eval", "merge", "generate", "export", "export-lora"])
def test_a_non_finite_adapter_is_refused_naming_the_tensor(command, adapter, tiny_model_dir, sft_data, tmp_path, capfd):
    broken = broken_adapter(adapter)
    args = {"train": [*train_args(tiny_model_dir, sft_data, tmp_path / "out"), "--init-adapter", broken],
            "eval": ["--model", tiny_model_dir, "--adapter", broken, "--data", sft_data, "--out", tmp_path / "eval"],
            "merge": ["--model", tiny_model_dir, "--adapter", broken, "--out", tmp_path / "merged"],
            "generate": ["--model", tiny_model_dir, "--adapter", broken, "--prompt", "hi", "--max-new-tokens", "2"],
            "export": ["gguf", "--model", tiny_model_dir, "--adapter", broken, "--out", tmp_path / "m.gguf"],
            "export-lora": ["gguf", "--model", tiny_model_dir, "--adapter", broken, "--lora-only",
                            "--out", tmp_path / "m.gguf"]}
    if command == "train":  # --init-adapter brings its own rank
        args["train"][args["train"].index("--lora-r"):args["train"].index("--lora-r") + 2] = []
    result = cli(command.split("-")[0], *args[command], capfd=capfd)
    assert result.code == 2 and "lora_B.weight has 1 non-finite values" in result.message
    for made in ("out", "eval", "merged", "m.gguf"):
        assert not (tmp_path / made).exists()


def test_a_malformed_lineage_header_is_one_line(adapter, tiny_model_dir, sft_data, tmp_path, capfd):
    broken = broken_adapter(adapter, value=0.0, header="{not json")
    args = [*train_args(tiny_model_dir, sft_data, tmp_path / "out"), "--init-adapter", broken]
    args[args.index("--lora-r"):args.index("--lora-r") + 2] = []
    result = cli("train", *args, capfd=capfd)
    assert result.code == 2 and "'lora_engine' header (lineage) is not valid JSON" in result.message


# ---------------------------------------------------------------------------- model folders

@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_shards_must_lie_inside_the_model_folder(shard, tiny_model_dir, sft_data, tmp_path, capfd):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    outside = tmp_path / "outside.safetensors"
    weights.rename(outside)
    if shard == "link.safetensors":
        (model / shard).symlink_to(outside)
    names = list(load_file(str(outside)))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    result = cli("train", *train_args(model, sft_data, tmp_path / "out"), capfd=capfd)
    assert result.code == 2 and "points outside the model folder" in result.message


# ---------------------------------------------------------------------------- eval and generate

def test_eval_out_pointing_at_a_file_or_a_model(tiny_model_dir, adapter, sft_data, tmp_path, capfd):
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep")
    for out, expected in ((a_file, "exists and is not a folder"), (tiny_model_dir, "holds a model")):
        result = cli("eval", "--model", tiny_model_dir, "--adapter", adapter, "--data", sft_data, "--out", out, capfd=capfd)
        assert result.code == 2 and expected in result.message
    assert a_file.read_text() == "keep"


@pytest.mark.parametrize("flags, expected", [
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0"),
    (["--temperature", "-1"], "--temperature -1.0: expected a finite number >= 0"),
    (["--top-p", "0"], "--top-p 0.0: expected a number in (0, 1]"),
    (["--top-p", "inf"], "--top-p inf: expected a number in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: expected at least 1"),
    (["--max-new-tokens", "100000"], "exceed the model's context of 512 tokens"),
])
def test_generate_rejects_bad_sampling_flags(flags, expected, tiny_model_dir, capfd):
    result = cli("generate", "--model", tiny_model_dir, "--prompt", "hello", *flags, capfd=capfd)
    assert result.code == 2 and expected in result.message


def test_generate_with_an_adapter_runs_from_the_cli(tiny_model_dir, adapter, capfd):
    result = cli("generate", "--model", tiny_model_dir, "--adapter", adapter, "--prompt", "hello", "--max-new-tokens", "3",
                 capfd=capfd)
    assert result.code == 0, result.stderr
