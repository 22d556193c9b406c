"""`python -m engine.merge`: the merged folder loads in transformers and in our loader with base+adapter logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from engine.adapters import LoRAConfig, inject_lora, lora_modules, save_adapter
from engine.errors import InputError, run_cli
from engine.merge import main
from models.loading import load_model
from models.quantized import quantize_linears
from tests.engine.conftest import write_hf_llama
from tests.tolerances import LOGITS_FP32_ATOL, assert_close

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random HF Llama folder (untied head) with stand-in tokenizer files to be copied."""
    path = write_hf_llama(tmp_path_factory.mktemp("base"), tie_word_embeddings=False)
    (path / "tokenizer.json").write_text('{"stand-in": true}\n')
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return path


def ids():
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(7))


def make_adapter(base_dir, out, quant=False):
    """Save an adapter with non-zero B; return the logits of base (NF4-rounded if ``quant``) + adapter."""
    model = load_model(base_dir)
    if quant:
        quantize_linears(model)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj"))
    torch.manual_seed(1)
    inject_lora(model, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
        logits = model(ids())
    save_adapter(model, cfg, out, str(base_dir))
    return logits


def test_merged_folder_loads_in_transformers_and_ours(base_dir, tmp_path, capsys):
    expected = make_adapter(base_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                       "--dtype", "fp32"])
    assert exit_info.value.code == 0
    assert "merged the adapter into 8 linear layers" in capsys.readouterr().out
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(hf(ids()).logits, expected, torch.float32, "transformers on merged", atol=LOGITS_FP32_ATOL)
        assert_close(load_model(out)(ids()), expected, torch.float32, "ours on merged", atol=LOGITS_FP32_ATOL)
    assert (out / "tokenizer.json").read_text() == (base_dir / "tokenizer.json").read_text()
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    assert "NF4" not in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no temporary folder left


def test_bf16_sharded_merge_equals_rounded_fp32_merge(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path / "adapter")
    common = ["--model", str(base_dir), "--adapter", str(tmp_path / "adapter")]
    assert main(common + ["--out", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    # 40 KB shards: the tiny model splits into several files plus an index.
    assert main(common + ["--out", str(tmp_path / "bf16"), "--max-shard-gb", str(40e3 / 2**30)]) == 0
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ref = load_model(tmp_path / "fp32").state_dict()
    for shard in shards:
        with safe_open(str(tmp_path / "bf16" / shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16 and torch.equal(t, ref[name].to(torch.bfloat16)), name
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    with torch.no_grad():
        ours = load_model(tmp_path / "bf16")(ids())
        assert_close(hf(ids()).logits, ours, torch.float32, "bf16 folder: transformers vs ours",
                     atol=LOGITS_FP32_ATOL)


def test_nf4_merge_onto_dequantized_base_says_so(base_dir, tmp_path, capsys):
    expected = make_adapter(base_dir, tmp_path / "adapter", quant=True)
    out = tmp_path / "merged"
    assert main(["--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--dtype", "fp32", "--quant", "nf4"]) == 0
    assert "dequantized" in capsys.readouterr().out
    assert "NF4" in (out / "README.md").read_text()
    with torch.no_grad():
        assert_close(load_model(out)(ids()), expected, torch.float32, "merged QLoRA", atol=LOGITS_FP32_ATOL)


def test_cli_error_is_one_line_and_nonzero(base_dir, tmp_path):
    """A real process: exit status 2, one ``error:`` line naming the missing file, no traceback."""
    (tmp_path / "adapter").mkdir()
    result = subprocess.run([sys.executable, "-m", "engine.merge", "--model", str(base_dir), "--adapter",
                             str(tmp_path / "adapter"), "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "adapter_config.json" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_existing_output_not_overwritten(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    args = ["--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]
    for extra in ([], ["--overwrite"]):  # a folder merge did not write is never replaced
        with pytest.raises(InputError, match="holds files not written by engine.merge"):
            main(args + extra)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()
    assert main(args) == 0  # an empty folder is fine
    with pytest.raises(InputError, match="already holds a merged model"):
        main(args)
    assert main(args + ["--overwrite"]) == 0 and (tmp_path / "out" / "merge.json").is_file()
