"""engine.comparison / engine.eval: losses equal a direct cross-entropy on full logits, switching
adapters equals loading each alone, the base row equals the adapter-disabled model, the KL-to-base
column leaves every loss as it was, the CLI end to end on the SmolLM2 fixture (with the trade-off
chart), and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.adapters import (
    LoRAConfig,
    check_adapter_fits,
    disable_adapters,
    inject_lora,
    load_adapter,
    lora_modules,
    read_adapter,
    remove_lora,
    save_adapter,
)
from engine.comparison import compare, markdown_table, rows_to_json
from engine.kl_to_base import loss_and_kl_to_base
from engine.data.samples import Sample
from engine.errors import EXIT_INPUT_ERROR, run_cli
from engine.eval import main as eval_main
from engine.losses.causal_lm import mean_loss
from models.config import LlamaConfig
from models.loading import load_model, save_model
from tests.engine.conftest import inject_random_lora
from tests.tolerances import assert_close
from tools.random_checkpoint import random_model

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 101
PAD = 0


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=77, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True)


def tiny_samples() -> list[Sample]:
    """Variable lengths (odd, 2..23); prompt tokens masked with -100, as SFT data has them."""
    g = torch.Generator().manual_seed(3)
    samples = []
    for i, (length, prompt) in enumerate([(7, 3), (23, 10), (2, 1), (13, 0), (17, 16), (5, 2), (11, 4)]):
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        labels = [-100] * max(prompt, 1) + ids[max(prompt, 1):]
        samples.append(Sample(ids, labels, f"tiny:{i}"))
    return samples


def direct_loss(model, samples: list[Sample]) -> float:
    """Σ CE(full logits[t], label[t+1]) over trainable tokens / their number, one sample at a time."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for s in samples:
            logits = model(torch.tensor([s.input_ids]))[0, :-1].double()  # (T-1, V)
            labels = torch.tensor(s.labels[1:])
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            count += int((labels != -100).sum())
    return (total / count).item()


def add_random_adapter(model, model_dir: Path, out: Path, cfg: LoRAConfig, seed: int) -> Path:
    """Inject an adapter with non-zero A and B (B ~ 0.1 N(0, 1)) and save it in PEFT format."""
    inject_random_lora(model, cfg, seed, 0.1)
    return save_adapter(model, cfg, out, str(model_dir))


def make_adapter(model_dir: Path, out: Path, cfg: LoRAConfig, seed: int) -> Path:
    return add_random_adapter(load_model(model_dir), model_dir, out, cfg, seed)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama folder and three adapters: a1, a2 with the same layout, b another."""
    root = tmp_path_factory.mktemp("tiny_eval")
    model_dir = save_model(random_model(tiny_config(), seed=1), root / "model")
    same = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    other = LoRAConfig(r=3, alpha=5, target_modules=("q_proj", "v_proj", "down_proj"), use_rslora=True)
    adapters = {"a1": make_adapter(model_dir, root / "a1", same, 1),
                "a2": make_adapter(model_dir, root / "a2", same, 2),
                "b": make_adapter(model_dir, root / "b", other, 3)}
    return model_dir, adapters


@pytest.mark.parametrize("batch_size", [1, 3])
def test_mean_loss_equals_direct_cross_entropy(tiny, batch_size):
    model_dir, adapters = tiny
    samples = tiny_samples()
    model = load_model(model_dir)
    base = mean_loss(model, samples, batch_size=batch_size, pad_id=PAD, device="cpu", progress=False)
    assert base.tokens == sum(s.loss_tokens for s in samples)
    assert_close(torch.tensor(base.loss), torch.tensor(direct_loss(model, samples)), torch.float32, "base loss")
    assert math.isclose(base.perplexity, math.exp(base.loss), rel_tol=1e-12)
    load_adapter(model, adapters["b"])
    tuned = mean_loss(model, samples, batch_size=batch_size, pad_id=PAD, device="cpu", progress=False)
    assert_close(torch.tensor(tuned.loss), torch.tensor(direct_loss(model, samples)), torch.float32, "adapter loss")
    assert abs(tuned.loss - base.loss) > 1e-3  # the adapter really changes the model


def test_switching_equals_loading_each_alone(tiny):
    """Order a1, a2 (copy into the same LoRA modules), b (new layout), a1 (back): every row equals a
    fresh base with only that adapter loaded; the base row equals the adapter-disabled model."""
    model_dir, paths = tiny
    sets = {"first": tiny_samples()[:4], "rest": tiny_samples()[4:]}
    order = ["a1", "a2", "b", "a1"]
    adapters = [read_adapter(paths[k], name=f"{k}#{i}") for i, k in enumerate(order)]
    model = load_model(model_dir)
    rows = compare(model, adapters, sets, batch_size=2, pad_id=PAD, device="cpu", progress=False)
    assert [r.name for r in rows] == ["base", "a1#0", "a2#1", "b#2", "a1#3"]
    assert not lora_modules(model)  # the plain base is back afterwards
    for row, key in zip(rows[1:], order):
        alone = load_model(model_dir)
        load_adapter(alone, paths[key])
        for name, samples in sets.items():
            expected = mean_loss(alone, samples, batch_size=2, pad_id=PAD, device="cpu", progress=False)
            assert row.results[name] == expected, (row.name, name)  # bitwise: same weights, same batches
        if key == "a1":
            with disable_adapters(alone):
                for name, samples in sets.items():
                    off = mean_loss(alone, samples, batch_size=2, pad_id=PAD, device="cpu", progress=False)
                    assert rows[0].results[name] == off, name
    assert rows[1].results == rows[4].results
    assert rows[1].results != rows[2].results


def test_kl_set_adds_kl_and_keeps_every_loss(tiny, tmp_path):
    """compare(kl_set="general"): every loss is the one without it (bitwise), the base's KL is 0.0,
    a fresh adapter's (B = 0) exactly 0.0, a random adapter's the one `loss_and_kl_to_base` gives;
    the table gets a "general KL to base" column after the general ones, the JSON a kl_to_base field."""
    model_dir, paths = tiny
    fresh_model = load_model(model_dir)
    inject_lora(fresh_model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "down_proj")))
    fresh = save_adapter(fresh_model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "down_proj")),
                         tmp_path / "fresh", str(model_dir))
    sets = {"domain": tiny_samples()[:4], "general": tiny_samples()[4:]}
    adapters = [read_adapter(paths["a1"]), read_adapter(fresh), read_adapter(paths["b"])]
    model = load_model(model_dir)
    plain = compare(model, adapters, sets, batch_size=2, pad_id=PAD, device="cpu", progress=False)
    rows = compare(model, adapters, sets, batch_size=2, pad_id=PAD, device="cpu", progress=False, kl_set="general")
    assert [r.results for r in rows] == [r.results for r in plain]
    assert all(r.kl_to_base == {} for r in plain)
    assert rows[0].kl_to_base == {"general": 0.0}  # the base: 0 by definition
    assert rows[2].kl_to_base == {"general": 0.0}  # the fresh adapter: exactly the base
    alone = load_model(model_dir)
    load_adapter(alone, paths["b"])
    expected = loss_and_kl_to_base(alone, sets["general"], batch_size=2, pad_id=PAD, device="cpu", progress=False)
    assert rows[3].kl_to_base == {"general": expected.kl_to_base} and expected.kl_to_base > 1e-3
    assert rows[1].kl_to_base["general"] > 1e-3

    header, _, base_line, a1_line, *_ = markdown_table(rows, list(sets)).splitlines()
    assert header.split(" | ")[4:] == ["general loss", "general ppl", "Δ general vs base", "general KL to base |"]
    assert base_line.endswith("| — |")
    assert a1_line.endswith(f"| {rows[1].kl_to_base['general']:.4g} |")
    assert "KL" not in markdown_table(plain, list(sets))
    as_json = rows_to_json(rows)
    assert [r["general"]["kl_to_base"] for r in as_json] == [r.kl_to_base["general"] for r in rows]
    assert all("kl_to_base" not in r["domain"] for r in as_json)


def test_nf4_base_rows_equal_direct_cross_entropy(tiny):
    """QLoRA evaluation: an NF4 base, adapters switched on it (the NF4 linears come back plain)."""
    model_dir, paths = tiny
    samples = tiny_samples()
    model = load_model(model_dir, quantize="nf4")
    rows = compare(model, [read_adapter(paths["a1"]), read_adapter(paths["b"])], {"all": samples},
                   batch_size=4, pad_id=PAD, device="cpu", progress=False)
    assert_close(torch.tensor(rows[0].results["all"].loss), torch.tensor(direct_loss(model, samples)),
                 torch.float32, "nf4 base loss")
    load_adapter(model, paths["b"])
    assert_close(torch.tensor(rows[2].results["all"].loss), torch.tensor(direct_loss(model, samples)),
                 torch.float32, "nf4 + adapter b loss")


def test_adapter_for_another_shape_is_refused(tiny, tmp_path):
    model_dir, _ = tiny
    other_cfg = tiny_config().replace(hidden_size=64, intermediate_size=80)
    other_dir = save_model(random_model(other_cfg, seed=0), tmp_path / "other")
    wrong = make_adapter(other_dir, tmp_path / "wrong", LoRAConfig(r=2, alpha=4, target_modules=("q_proj",)), 0)
    with torch.device("meta"):
        from models.llama import LlamaForCausalLM
        skeleton = LlamaForCausalLM(tiny_config())
    from engine.errors import InputError
    with pytest.raises(InputError, match=r"lora_A\.weight has shape \(2, 64\), expected \(2, 48\)"):
        check_adapter_fits(skeleton, read_adapter(wrong))


# ----------------------------------------------------------------------------- CLI on the real fixture

def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(eval_main, argv)
    return exit_info.value.code


@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory):
    """The SmolLM2 fixture loaded once, a 2-sample slice of the license eval set, 1 general text,
    and one adapter (q_proj, v_proj; non-zero B) saved from that model, which is then plain again."""
    root = tmp_path_factory.mktemp("smol_eval")
    lines = (ROOT / "examples" / "license_qa_eval.jsonl").read_text().splitlines()
    (root / "domain.jsonl").write_text("\n".join(lines[:2]) + "\n")
    general = (ROOT / "examples" / "general_text.jsonl").read_text().splitlines()
    (root / "general.jsonl").write_text(general[0] + "\n")
    model_dir = Path(smollm2_dir)
    model = load_model(model_dir)
    adapter = add_random_adapter(model, model_dir, root / "adapter",
                                 LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")), seed=5)
    remove_lora(model)
    return model_dir, root, adapter, model


def test_cli_end_to_end(smol, capsys):
    model_dir, root, adapter, model = smol
    out = root / "out"
    argv = ["--model", str(model_dir), "--adapter", str(adapter), "--data", str(root / "domain.jsonl"),
            "--general", str(root / "general.jsonl"), "--out", str(out), "--batch-size", "3",
            "--max-len", "96", "--no-progress"]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 1000
    assert (out / "eval_tradeoff.png").stat().st_size > 1000
    assert f"{out / 'eval_tradeoff.png'}" in printed.splitlines()[-1]
    assert (out / "eval.md").read_text().strip() in printed
    base, tuned = result["rows"]
    assert (base["name"], tuned["name"]) == ("base", str(adapter))

    # The base's domain loss equals a direct computation on the same samples.
    from engine.data.samples import load_samples
    from models import load_tokenizer
    samples, _ = load_samples(root / "domain.jsonl", load_tokenizer(model_dir), max_len=96)
    assert base["domain"]["tokens"] == sum(s.loss_tokens for s in samples)
    assert_close(torch.tensor(base["domain"]["loss"]), torch.tensor(direct_loss(model, samples)),
                 torch.float32, "base domain loss")

    assert base["general"]["kl_to_base"] == 0.0 and tuned["general"]["kl_to_base"] > 1e-6
    assert "kl_to_base" not in tuned["domain"]
    for part in ("domain", "general"):
        assert tuned[part]["tokens"] == base[part]["tokens"] > 0
        assert abs(tuned[part]["loss"] - base[part]["loss"]) > 1e-4  # non-zero B changes the numbers
        assert math.isclose(tuned[part]["delta_loss_vs_base"], tuned[part]["loss"] - base[part]["loss"])
        assert math.isclose(tuned[part]["perplexity"], math.exp(tuned[part]["loss"]), rel_tol=1e-9)
    table = printed.splitlines()
    header = next(line for line in table if line.startswith("| model"))
    assert header.split(" | ")[1:4] == ["domain loss", "domain ppl", "Δ domain vs base"]
    base_line = next(line for line in table if line.startswith("| base |"))
    assert f"{base['domain']['loss']:.4f}" in base_line and f"{base['general']['loss']:.4f}" in base_line
    tuned_line = next(line for line in table if line.startswith(f"| {adapter} |"))
    assert f"{tuned['domain']['delta_loss_vs_base']:+.4f}" in tuned_line
    assert header.split(" | ")[-1] == "general KL to base |"
    assert tuned_line.endswith(f"| {tuned['general']['kl_to_base']:.4g} |") and base_line.endswith("| — |")


def test_cli_bad_input(smol, tiny, tmp_path, capsys):
    model_dir, root, adapter, _ = smol
    common = ["--model", str(model_dir), "--data", str(root / "domain.jsonl"), "--out", str(tmp_path / "o")]
    assert run(common + ["--adapter", str(tmp_path / "missing")]) == EXIT_INPUT_ERROR
    assert "adapter folder not found" in capsys.readouterr().err
    tiny_dir, tiny_adapters = tiny  # made for a 2-layer, 48-wide model; SmolLM2 has 30 layers, 576 wide
    assert run(common + ["--adapter", str(tiny_adapters["a1"])]) == EXIT_INPUT_ERROR
    assert "no weights for targeted module 'model.layers." in capsys.readouterr().err
    one_module = make_adapter(tiny_dir, tmp_path / "one", LoRAConfig(r=2, alpha=4, target_modules=r"model\.layers\.0\.self_attn\.q_proj"), 0)
    assert run(common + ["--adapter", str(one_module)]) == EXIT_INPUT_ERROR
    assert "lora_A.weight has shape (2, 48), expected (2, 576)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{"messages": [\n')
    assert run(["--model", str(model_dir), "--adapter", str(adapter), "--data", str(bad)]) == EXIT_INPUT_ERROR
    assert f"{bad}:2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_cli_named_adapters_and_none(tiny_model_dir, tmp_path, capsys):
    """--adapter NAME=DIR names the row NAME (the numbers are those of --adapter DIR, whose row keeps
    the folder path as its name); --adapter none is the base row, always first, so it adds none;
    a NAME of 'base' or given twice exits 2."""
    lines = (ROOT / "examples" / "license_qa_eval.jsonl").read_text().splitlines()
    (tmp_path / "domain.jsonl").write_text("\n".join(lines[:2]) + "\n")
    a = add_random_adapter(load_model(tiny_model_dir), tiny_model_dir, tmp_path / "a",
                           LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")), seed=1)
    b = add_random_adapter(load_model(tiny_model_dir), tiny_model_dir, tmp_path / "b",
                           LoRAConfig(r=4, alpha=4, target_modules="all-linear"), seed=2)
    common = ["--model", str(tiny_model_dir), "--data", str(tmp_path / "domain.jsonl"), "--max-len", "64",
              "--no-progress"]

    def rows(*adapters: str) -> list[dict]:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        assert run(common + [x for spec in adapters for x in ("--adapter", spec)] + ["--out", str(out)]) == 0
        return json.loads((out / "eval.json").read_text())["rows"]

    named = rows(f"math={a}", "none", str(b))
    assert [r["name"] for r in named] == ["base", "math", str(b)]
    plain = rows(str(a))
    assert [r["name"] for r in plain] == ["base", str(a)]
    assert plain[1]["domain"] == named[1]["domain"] and plain[0]["domain"] == named[0]["domain"]
    assert named[1]["domain"]["loss"] != named[2]["domain"]["loss"]
    assert [r["name"] for r in rows("none")] == ["base"]
    capsys.readouterr()
    assert run(common + ["--adapter", f"base={a}", "--out", str(tmp_path / "bad")]) == EXIT_INPUT_ERROR
    assert "'base' is the base row's name" in capsys.readouterr().err
    assert run(common + ["--adapter", f"x={a}", "--adapter", f"x={b}", "--out", str(tmp_path / "bad")]) == \
        EXIT_INPUT_ERROR
    assert "'x' is given twice" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
