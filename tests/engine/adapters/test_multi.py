"""engine.adapters.multi: a batch whose rows use different adapters (or none) equals each row run
alone with only its adapter loaded; the --adapter NAME=DIR flags; what cannot be gathered is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.adapters import LoRAConfig, load_adapter, read_adapter, save_adapter
from engine.adapters.multi import MultiLoRALinear, adapter_spec, adapter_specs, inject_adapters
from engine.errors import InputError
from kernels.backend import force_triton
from models.config import LlamaConfig
from models.loading import load_model, save_model
from tests.engine.conftest import inject_random_lora
from tests.tolerances import LOGITS_FP32_ATOL, assert_close
from tools.random_checkpoint import random_model

# three layouts: different ranks, targets, a rank/alpha pattern and rsLoRA
CONFIGS = {
    "a": LoRAConfig(r=4, alpha=8, target_modules="all-linear"),
    "b": LoRAConfig(r=8, alpha=5, target_modules=("q_proj", "v_proj", "down_proj"), use_rslora=True),
    "c": LoRAConfig(r=2, alpha=4, target_modules=("o_proj", "up_proj"), rank_pattern={"up_proj": 6},
                    alpha_pattern={"o_proj": 1.0}),
}


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=77, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True)


def save_random_adapter(model_dir: Path, out: Path, cfg: LoRAConfig, seed: int) -> Path:
    """An adapter with non-zero A and B (B ~ 0.2 N(0, 1)), saved in PEFT format."""
    model = load_model(model_dir)
    inject_random_lora(model, cfg, seed, 0.2)
    return save_adapter(model, cfg, out, str(model_dir))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    model_dir = save_model(random_model(tiny_config(), seed=4), root / "model")
    paths = {name: save_random_adapter(model_dir, root / name, cfg, seed)
             for seed, (name, cfg) in enumerate(CONFIGS.items(), start=1)}
    return model_dir, paths


def alone_logits(model_dir, path, ids):
    model = load_model(model_dir)
    if path is not None:
        load_adapter(model, path)
    with torch.no_grad():
        return model(ids)


ROWS = ["a", "none", "b", "c", "a", "b"]


def test_mixed_batch_equals_each_row_alone(tiny):
    model_dir, paths = tiny
    ids = torch.randint(0, 97, (len(ROWS), 9), generator=torch.Generator().manual_seed(0))
    model = load_model(model_dir)
    multi = inject_adapters(model, [read_adapter(paths[n], name=n) for n in ("a", "b", "c")])
    assert multi.names == ("a", "b", "c")
    assert set(multi.modules) == {n for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    with torch.no_grad(), multi.selected(ROWS):
        got = model(ids)
    for row, name in enumerate(ROWS):
        want = alone_logits(model_dir, None if name == "none" else paths[name], ids[row:row + 1])[0]
        assert_close(got[row], want, torch.float32, f"logits of row {row} ({name})")
    # Bit for bit against the base model on the same batch (same shapes, so the same matmul
    # blocking; a batch of one row may round differently with several threads).
    base = alone_logits(model_dir, None, ids)[1]
    assert torch.equal(got[1], base), "the base row must be the base model's logits exactly"
    assert (got[0] - alone_logits(model_dir, None, ids[0:1])[0]).abs().max() > 1e-2  # adapters matter
    multi.remove()
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())


def test_mixed_batch_through_the_triton_kernel(tiny):
    """The same batch with the Triton kernels (interpreter on a CPU) against the reference."""
    model_dir, paths = tiny
    ids = torch.randint(0, 97, (4, 5), generator=torch.Generator().manual_seed(1))
    model = load_model(model_dir)
    multi = inject_adapters(model, [read_adapter(paths[n], name=n) for n in ("a", "b", "c")])
    rows = ["c", "a", "none", "a"]
    with torch.no_grad(), multi.selected(rows):
        want = model(ids)
        with force_triton():
            got = model(ids)
    assert_close(got, want, torch.float32, "logits", atol=LOGITS_FP32_ATOL)


def test_selection_is_required_and_checked(tiny):
    model_dir, paths = tiny
    model = load_model(model_dir)
    multi = inject_adapters(model, [read_adapter(paths["a"], name="a")])
    ids = torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no adapters selected"):
        model(ids)
    with pytest.raises(InputError, match="unknown adapter 'z'"):
        multi.ids(["a", "z"])
    with pytest.raises(InputError, match="adapter id 1"):
        multi.ids([1])
    with torch.no_grad(), multi.selected(["a"]), pytest.raises(ValueError, match="2 sequences|1 sequences"):
        model(ids)


def test_refuses_what_cannot_be_gathered(tiny, tmp_path):
    model_dir, paths = tiny
    model = load_model(model_dir)
    with pytest.raises(InputError, match="'a' is given twice"):
        inject_adapters(model, [read_adapter(paths["a"], name="a"), read_adapter(paths["b"], name="a")])
    load_adapter(model, paths["a"])
    with pytest.raises(InputError, match="already has adapters"):
        inject_adapters(model, [read_adapter(paths["b"], name="b")])
    reward = read_adapter(paths["a"], name="r")
    reward.config.modules_to_save = ("score",)
    with pytest.raises(InputError, match="score head"):
        inject_adapters(load_model(model_dir), [reward])
    mixed = load_model(model_dir)
    mixed.model.layers[1].self_attn.v_proj.to(torch.bfloat16)
    with pytest.raises(InputError, match=r"layers\.1\.self_attn\.v_proj: weight dtype torch\.bfloat16 differs"):
        inject_adapters(mixed, [read_adapter(paths["b"], name="b")])
    dora = tmp_path / "dora"
    shutil.copytree(paths["a"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(InputError, match="a dora adapter; gathering several adapters per row takes LoRA adapters only"):
        inject_adapters(load_model(model_dir), [read_adapter(dora)])  # refused before anything is stacked
    other = save_model(random_model(tiny_config().replace(hidden_size=64), seed=0), tmp_path / "other")
    wrong = save_random_adapter(other, tmp_path / "wrong", LoRAConfig(r=2, alpha=4, target_modules=("q_proj",)), 0)
    with pytest.raises(InputError, match=r"expected \(2, 48\)"):
        inject_adapters(load_model(model_dir), [read_adapter(wrong, name="w")])


def test_adapter_specs(tmp_path):
    (tmp_path / "lr=1e-4").mkdir()
    assert adapter_spec("none").is_base
    assert adapter_spec("math=runs/a") == adapter_spec("math=runs/a") and adapter_spec("math=runs/a").name == "math"
    assert adapter_spec("runs/a").name is None  # plain DIR: the command names it
    assert adapter_spec(str(tmp_path / "lr=1e-4")).path == tmp_path / "lr=1e-4"  # an existing folder wins
    for bad, message in (("=dir", "not an adapter name"), ("a b=dir", "not an adapter name"),
                         ("none=dir", "is the base"), ("x=", "no folder")):
        with pytest.raises(InputError, match=message):
            adapter_spec(bad)
    with pytest.raises(InputError, match="'x' is given twice"):
        adapter_specs(["x=a", "x=b"])
    with pytest.raises(InputError, match="'none' is given twice"):
        adapter_specs(["none", "none"])


def test_nf4_base(tiny):
    """QLoRA: the adapters gathered over an NF4 base equal each one loaded alone on that base."""
    model_dir, paths = tiny
    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(2))
    model = load_model(model_dir, quantize="nf4")
    multi = inject_adapters(model, [read_adapter(paths[n], name=n) for n in ("b", "c")])
    rows = ["c", "none", "b"]
    with torch.no_grad(), multi.selected(rows):
        got = model(ids)
    for row, name in enumerate(rows):
        alone = load_model(model_dir, quantize="nf4")
        if name != "none":
            load_adapter(alone, paths[name])
        with torch.no_grad():
            assert_close(got[row], alone(ids[row:row + 1])[0], torch.float32, f"nf4 row {row} ({name})")
