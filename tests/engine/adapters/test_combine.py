"""`engine.adapters.combine` and ``python -m engine.merge --combine``: the combined adapter's factors and
config are PEFT 0.21's ``add_weighted_adapter`` ones (linear, cat, magnitude_prune, ties, dare_linear,
dare_ties), and bad input exits 2."""

import json

import peft
import pytest
import torch
import transformers

from engine.adapters import LoRAConfig, inject_lora, lora_modules, read_adapter_weights, save_adapter
from engine.adapters.combine import Combination, combine_to_folder, module_order
from engine.errors import InputError, run_cli
from engine.merge import main
from models.loading import load_model
from tests.engine.conftest import write_hf_llama
from tests.tolerances import LOGITS_FP32_ATOL, assert_close

CONFIGS = {  # overlapping targets, different scales (alpha, alpha_pattern, rsLoRA), one rank
    "one": LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj", "down_proj")),
    "two": LoRAConfig(r=4, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                    alpha_pattern={"k_proj": 2.0}),
    "three": LoRAConfig(r=4, alpha=4, target_modules=("v_proj", "gate_proj"), use_rslora=True),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny base and three adapters of it with random non-zero A and B."""
    root = tmp_path_factory.mktemp("combine")
    base = write_hf_llama(root / "base", tie_word_embeddings=False)
    for seed, (name, cfg) in enumerate(CONFIGS.items()):
        model = load_model(base)
        inject_lora(model, cfg)
        g = torch.Generator().manual_seed(10 + seed)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g))
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)
        save_adapter(model, cfg, root / name, str(base))
    return root


def peft_model(root, names):
    hf = transformers.LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(hf, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    return model


def peft_factors(model, adapter):
    return {name: (m.lora_A[adapter].weight, m.lora_B[adapter].weight)
            for name, m in model.base_model.model.named_modules()
            if hasattr(m, "lora_A") and adapter in m.lora_A}


def logits(model, adapter):
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(torch.arange(2, 11).view(1, 9)).logits


def compare(model, ours_dir, adapter):
    """Every factor ours vs PEFT's combined ``adapter``; then our folder loaded in PEFT gives its model."""
    theirs, ours = peft_factors(model, adapter), read_adapter_weights(ours_dir)
    assert sorted(ours) == sorted(theirs)
    for name, (a, b) in theirs.items():
        assert_close(ours[name]["lora_A"], a, torch.float32, f"{name}.lora_A")
        assert_close(ours[name]["lora_B"], b, torch.float32, f"{name}.lora_B")
    model.load_adapter(ours_dir, adapter_name="ours")
    cfg, ref = model.peft_config["ours"], model.peft_config[adapter]
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules)) == (ref.r, ref.lora_alpha, set(ref.target_modules))
    assert_close(logits(model, "ours"), logits(model, adapter), torch.float32, "PEFT logits: ours vs its own",
                 atol=LOGITS_FP32_ATOL)


@pytest.mark.parametrize("kind,density,sign", [
    ("linear", None, "total"), ("cat", None, "total"), ("magnitude_prune", 0.5, "total"), ("ties", 0.5, "total"),
    ("ties", 0.7, "frequency"), ("dare_linear", 0.5, "total"), ("dare_ties", 0.5, "total")])
def test_matches_peft_add_weighted_adapter(folders, tmp_path, kind, density, sign):
    names, weights = ["one", "two"], [0.6, -0.4]
    model = peft_model(folders, names)
    extra = {"density": density} if density is not None else {}
    if kind in ("ties", "dare_ties"):
        extra["majority_sign_method"] = sign
    torch.manual_seed(3)  # dare_ties: --seed 3 is PEFT's result after torch.manual_seed(3)
    model.add_weighted_adapter(names, weights, "mix", combination_type=kind, **extra)
    combine_to_folder([str(folders / n) for n in names], Combination(kind, weights, density, sign, seed=3),
                      tmp_path / "out")
    compare(model, tmp_path / "out", "mix")


@pytest.mark.parametrize("kind", ["ties", "dare_ties"])
def test_three_adapters_rslora_first(folders, tmp_path, kind):
    """Factors as PEFT's (modules present in one, two or three adapters); our config says
    use_rslora false (s' = 1), where PEFT keeps the first adapter's true and so scales its own
    combination by sqrt(r)."""
    names, weights = ["three", "one", "two"], [1.0, 0.5, 0.25]
    model = peft_model(folders, names)
    torch.manual_seed(11)
    model.add_weighted_adapter(names, weights, "mix", combination_type=kind, density=0.6)
    combine_to_folder([str(folders / n) for n in names], Combination(kind, weights, density=0.6, seed=11),
                      tmp_path / "o")
    theirs, ours = peft_factors(model, "mix"), read_adapter_weights(tmp_path / "o")
    for name, (a, b) in theirs.items():
        assert_close(ours[name]["lora_A"], a, torch.float32, f"{name}.lora_A")
        assert_close(ours[name]["lora_B"], b, torch.float32, f"{name}.lora_B")
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 4, False)
    assert model.peft_config["mix"].use_rslora  # PEFT's quirk, documented in combine.py


def test_cat_of_different_ranks_is_the_sum_of_deltas(folders, tmp_path):
    """cat stacks adapters of any ranks (r 4 and 8, a rank_pattern): R = 4 + 8, PEFT's factors and
    config, and s'·B'A' = Σ w_i s_i B_i A_i exactly for every module, zeros where one is absent."""
    base = folders / "base"
    cfg = LoRAConfig(r=2, alpha=8, target_modules=("q_proj", "gate_proj"), rank_pattern={"gate_proj": 8})
    model = load_model(base)
    inject_lora(model, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))
    save_adapter(model, cfg, tmp_path / "r8", str(base))
    names, weights = ["one", "r8"], [0.5, 2.0]
    peft = peft_model(folders, ["one"])
    peft.load_adapter(tmp_path / "r8", adapter_name="r8")
    peft.add_weighted_adapter(names, weights, "mix", combination_type="cat")
    dirs = [str(folders / "one"), str(tmp_path / "r8")]
    config = combine_to_folder(dirs, Combination("cat", weights), tmp_path / "out")
    assert (config["r"], config["lora_alpha"]) == (4 + 8, 4 + 8)
    compare(peft, tmp_path / "out", "mix")
    ours, srcs = read_adapter_weights(tmp_path / "out"), [read_adapter_weights(d) for d in dirs]
    scales = [lambda m: 8 / 4, lambda m: 8 / (8 if "gate_proj" in m else 2)]
    for module, pair in ours.items():
        want = sum(w * s(module) * src[module]["lora_B"] @ src[module]["lora_A"]
                   for w, s, src in zip(weights, scales, srcs) if module in src)
        assert_close(pair["lora_B"] @ pair["lora_A"], want, torch.float32, module)


def test_single_adapter_linear_is_the_adapter(folders, tmp_path):
    """One rsLoRA adapter at weight 1: the combined delta s' B'A' is the adapter's own s B A."""
    combine_to_folder([str(folders / "three")], Combination("ties", [1.0], density=0.5), tmp_path / "o")
    src, out = read_adapter_weights(folders / "three"), read_adapter_weights(tmp_path / "o")
    scale = 4 / 4 ** 0.5
    for name, pair in src.items():
        assert_close(out[name]["lora_B"] @ out[name]["lora_A"], scale * pair["lora_B"] @ pair["lora_A"],
                     torch.float32, name)


def test_dare_seed_reproducible_and_order(folders, tmp_path):
    args = [str(folders / "one"), str(folders / "two")]
    for out in ("x", "y"):
        combine_to_folder(args, Combination("dare_ties", [0.5, 0.5], density=0.5, seed=7), tmp_path / out)
    x, y = read_adapter_weights(tmp_path / "x"), read_adapter_weights(tmp_path / "y")
    assert all(torch.equal(x[m]["lora_A"], y[m]["lora_A"]) for m in x)
    names = ["lm_head", "model.layers.1.mlp.gate_proj", "model.layers.0.mlp.down_proj",
             "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj"]
    assert sorted(names, key=module_order) == names[::-1]


# ----------------------------------------------------------------------------- CLI errors

def cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_writes_adapter(folders, tmp_path, capsys):
    code, _ = cli(["--combine", "ties", "--adapter", str(folders / "one"), "--adapter", str(folders / "two"),
                   "--weights", "0.6,0.4", "--density", "0.5", "--out", str(tmp_path / "o")], capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture(scope="module")
def odd_adapters(folders):
    """Adapters that cannot be combined with ``a``: one of a base with other sizes (but the same
    recorded base name: the sizes tell), one of rank 8, one with a regex target."""
    other = folders / "other-base"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)).save_pretrained(other)
    made = {}
    for name, base, lora in (("other", other, LoRAConfig(r=4, alpha=8, target_modules=("up_proj",))),
                             ("r8", folders / "base", LoRAConfig(r=8, alpha=8, target_modules=("q_proj",))),
                             ("regex", folders / "base", LoRAConfig(r=4, alpha=8, target_modules=r".*\.q_proj"))):
        model = load_model(base)
        inject_lora(model, lora)
        save_adapter(model, lora, folders / name, str(folders / "base"))
        made[name] = str(folders / name)
    return made


@pytest.mark.parametrize("case,flag", [
    ("other", "different bases"), ("r8", "one LoRA rank"), ("regex", "regex"),
    ("weights", "--weights"), ("density-missing", "--density"), ("density-bad", "--density"),
    ("density-linear", "--density"), ("base-name", "different bases"), ("sign-cat", "--majority-sign"),
    ("seed-magnitude", "--seed")])
def test_cli_refuses_and_writes_nothing(folders, odd_adapters, tmp_path, capsys, case, flag):
    a = str(folders / "one")
    args = {"other": ["--combine", "linear", "--adapter", a, "--adapter", odd_adapters["other"],
                      "--weights", "1,1"],
            "r8": ["--combine", "linear", "--adapter", a, "--adapter", odd_adapters["r8"], "--weights", "1,1"],
            "regex": ["--combine", "linear", "--adapter", a, "--adapter", odd_adapters["regex"], "--weights", "1,1"],
            "weights": ["--combine", "linear", "--adapter", a, "--adapter", str(folders / "two"), "--weights", "1"],
            "density-missing": ["--combine", "ties", "--adapter", a, "--adapter", str(folders / "two"),
                                "--weights", "1,1"],
            "density-bad": ["--combine", "dare_ties", "--adapter", a, "--adapter", str(folders / "two"),
                            "--weights", "1,1", "--density", "0"],
            "density-linear": ["--combine", "linear", "--adapter", a, "--adapter", str(folders / "two"),
                               "--weights", "1,1", "--density", "0.5"],
            "sign-cat": ["--combine", "cat", "--adapter", a, "--adapter", str(folders / "two"), "--weights", "1,1",
                         "--majority-sign", "frequency"],
            "seed-magnitude": ["--combine", "magnitude_prune", "--adapter", a, "--adapter", str(folders / "two"),
                               "--weights", "1,1", "--density", "0.5", "--seed", "3"]}.get(case)
    if case == "base-name":
        renamed = tmp_path / "renamed"
        renamed.mkdir()
        config = json.loads((folders / "two" / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "someone/else"
        (renamed / "adapter_config.json").write_text(json.dumps(config))
        weights = "adapter_model.safetensors"
        (renamed / weights).write_bytes((folders / "two" / weights).read_bytes())
        args = ["--combine", "linear", "--adapter", a, "--adapter", str(renamed), "--weights", "1,1"]
    code, err = cli(args + ["--out", str(tmp_path / "out")], capsys)
    assert code == 2 and flag in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode,extra,flags", [
    ("combine", ["--dtype", "fp16", "--drift-samples", "4"], "--dtype, --drift-samples"),
    ("merge", ["--weights", "1"], "--weights"),
    ("vllm", ["--onto", "original"], "--onto, --out"),
])
def test_cli_refuses_flags_of_another_mode(folders, tmp_path, capsys, mode, extra, flags):
    """A flag the chosen mode would ignore stops it (exit 2) before anything is read or written."""
    a, out = str(folders / "one"), str(tmp_path / "out")
    args = {"combine": ["--combine", "linear", "--adapter", a, "--adapter", str(folders / "two"), "--weights", "1,1"],
            "merge": ["--model", str(tmp_path / "no-model"), "--adapter", a],
            "vllm": ["--check-vllm", "--adapter", a]}[mode]
    code, err = cli(args + extra + ["--out", out], capsys)
    assert code == 2 and f"{flags}: not used" in err, err
    assert not (tmp_path / "out").exists()


def test_api_refuses_bad_weights(folders, tmp_path):
    with pytest.raises(InputError, match="--weights"):
        combine_to_folder([str(folders / "one")], Combination("linear", [float("nan")]), tmp_path / "o")
