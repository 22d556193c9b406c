"""Can vLLM serve this PEFT adapter as LoRA (``--enable-lora``, a LoRARequest per prompt), and if
not, what to change? `vllm_verdict` answers from ``adapter_config.json`` and the tensor names and
shapes alone (no vLLM import, no base model).

The rules, as read in vLLM's source (main of late 2026; the older releases noted where they differ):

* rank: the server allocates every LoRA slot at ``--max-lora-rank``, one of
  1, 8, 16, 32, 64, 128, 256, 320, 512 (``vllm/config/lora.py``, ``MaxLoRARanks``; releases up to
  ~0.10 checked 8 ... 512 in ``LoRAConfig.__post_init__``; default 16). An adapter whose largest
  module rank is above 512 cannot be served; otherwise we name the smallest of 8 ... 512 that
  holds it (valid in both).
* one scale per adapter: ``PEFTHelper`` computes s = lora_alpha / r (``use_rslora``:
  lora_alpha / sqrt(r), which vLLM reads, so rsLoRA is fine) and ``LoRALayerWeights.from_config``
  gives that s to every module: ``rank_pattern`` / ``alpha_pattern`` are ignored. An adapter whose
  patterns give some module another scale would be served wrong: a problem (fold s_m / s into that
  module's lora_B and drop the patterns, or merge).
* no DoRA (``use_dora``: "vLLM does not yet support DoRA"), no ``modules_to_save`` ("vLLM only
  supports modules_to_save being None": a reward model's score head), no trained biases
  (``bias`` / ``lora_bias``: "Adapter bias cannot be used without bias_enabled", a server option
  not every release has), no ``fan_in_fan_out`` (vLLM reads A (r, in), B (out, r)).
* modules: vLLM's Llama packs q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``
  (``packed_modules_mapping``) and loads LoRA for q, k, v, o, gate, up, down; ``lm_head`` and
  ``embed_tokens`` are its ``embedding_modules`` (lm_head through the logits processor's LoRA,
  vocabularies up to 257024): served, noted. Any other module name (or a tensor that is not a
  LoRA A/B) makes vLLM refuse the adapter ("expected target modules in ...").
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from engine.adapters.lora import LLAMA_LINEARS, OUTPUT_HEAD, LoRAConfig, lora_scale
from engine.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from engine.errors import InputError

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_LLAMA_MODULES = set(LLAMA_LINEARS) | {OUTPUT_HEAD, "embed_tokens"}
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<which>lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B)(?:\.default)?(?:\.weight)?$")


@dataclass
class VllmVerdict:
    """``problems``: what stops vLLM serving the adapter as LoRA, each with what to change;
    ``notes``: how to serve it when it can (server flags, special modules)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_lora_rank: int | None = None  # the --max-lora-rank to pass (None: no rank could be read)

    @property
    def servable(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: the verdict and how to serve it, or the first problem (and how many more)."""
        if self.servable:
            flags = "--enable-lora" + (f" --max-lora-rank {self.max_lora_rank}"
                                       if self.max_lora_rank and self.max_lora_rank > VLLM_DEFAULT_MAX_LORA_RANK
                                       else "")
            return f"vLLM can serve it as LoRA ({flags})" + "".join(f"; {n}" for n in self.notes)
        n = len(self.problems) - 1
        more = f" (and {n} more: python -m engine.merge --check-vllm)" if n else ""
        return f"vLLM cannot serve it as LoRA: {self.problems[0]}{more}"


def _module_scales(config: dict[str, Any], ranks: dict[str, int]) -> tuple[float, dict[str, float]]:
    """(vLLM's one scale, PEFT's scale per module) from the config's r, alpha, patterns, rsLoRA."""
    rslora = bool(config.get("use_rslora", False))
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    cfg = LoRAConfig(r=r, alpha=alpha, rank_pattern=config.get("rank_pattern") or {},
                     alpha_pattern=config.get("alpha_pattern") or {}, use_rslora=rslora)
    return lora_scale(r, alpha, rslora), {m: lora_scale(cfg.rank_for(m), cfg.alpha_for(m), rslora) for m in ranks}


def vllm_verdict(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> VllmVerdict:
    """The verdict for an adapter with this ``adapter_config.json`` content and these safetensors
    tensor names -> shapes (see the module docstring for each rule)."""
    v = VllmVerdict()
    if config.get("peft_type", "LORA") != "LORA":
        v.problems.append(f"peft_type is {config.get('peft_type')!r}: vLLM serves LoRA adapters only")
        return v
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            v.problems.append(f"adapter_config.json has no positive {key!r}, which vLLM requires")
            return v
    if config.get("use_dora"):
        v.problems.append("a DoRA adapter (use_dora): vLLM does not serve DoRA; retrain as plain LoRA or merge it "
                          "into the base (python -m engine.merge) and serve the merged model")
    if config.get("modules_to_save"):
        v.problems.append(f"modules_to_save={config['modules_to_save']!r} (e.g. a reward model's score head): vLLM "
                          "only serves adapters without it; score a reward model with engine.reward_model")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        v.problems.append("the adapter trains biases (bias/lora_bias): vLLM refuses them unless the server enables "
                          "LoRA bias (--enable-lora-bias, where the release has it); retrain with bias 'none' or merge it")
    if config.get("fan_in_fan_out"):
        v.problems.append("fan_in_fan_out is true (Conv1D layout): vLLM reads A (r, in) and B (out, r); re-save the "
                          "factors transposed with fan_in_fan_out false")

    ranks: dict[str, int] = {}
    others: list[str] = []
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if match is None:
            others.append(key)
        elif match["which"] in ("lora_A", "lora_embedding_A") and len(shape) == 2:
            ranks[match["module"]] = int(shape[0] if match["which"] == "lora_A" else shape[1])
    if others and not config.get("modules_to_save"):
        v.problems.append(f"{WEIGHTS_NAME} holds tensors that are not LoRA A/B ({others[0]!r}, {len(others)} in "
                          "all; DoRA magnitudes or whole modules?): vLLM refuses them")
    unknown = sorted({m.split(".")[-1] for m in ranks} - VLLM_LLAMA_MODULES)
    if unknown:
        v.problems.append(f"LoRA on {', '.join(unknown)}: vLLM's Llama has LoRA layers for "
                          f"{', '.join(LLAMA_LINEARS)} (and lm_head, embed_tokens) only; retrain without them")
    special = sorted({m.split(".")[-1] for m in ranks} & {OUTPUT_HEAD, "embed_tokens"})
    if special:
        v.notes.append(f"{' and '.join(special)} adapted: vLLM serves that through its embedding/logits LoRA "
                       "(vocabulary up to 257024)")
    if not ranks:
        v.problems.append(f"{WEIGHTS_NAME} holds no LoRA weights")
        return v

    largest = max(ranks.values())
    if largest > VLLM_MAX_LORA_RANKS[-1]:
        v.problems.append(f"rank {largest} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}; "
                          "retrain with r <= 512 or merge it")
    else:
        v.max_lora_rank = next(n for n in VLLM_MAX_LORA_RANKS[1:] if n >= largest)
        if config.get("use_rslora"):
            v.notes.append("rsLoRA: vLLM applies lora_alpha/sqrt(r) itself")
    try:
        scale, per_module = _module_scales(config, ranks)
    except InputError as err:
        v.problems.append(f"adapter_config.json: {err}")
        return v
    off = sorted(m for m, s in per_module.items() if not math.isclose(s, scale, rel_tol=1e-6))
    if off:
        v.problems.append(f"rank_pattern/alpha_pattern give {len(off)} modules (e.g. {off[0]}: "
                          f"{per_module[off[0]]:g}) another scale than alpha/r = {scale:g}; vLLM applies {scale:g} "
                          "to every module: fold each module's scale ratio into its lora_B and drop the patterns, "
                          "or merge the adapter")
    return v


def vllm_lora_problems(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """What stops vLLM serving this adapter as LoRA ([] when it can), each with what to change."""
    return vllm_verdict(config, shapes).problems


def check_vllm(adapter_dir: str | Path) -> VllmVerdict:
    """`vllm_verdict` of an adapter folder (its config and tensor shapes; no tensor is loaded)."""
    config_path, weights_path = Path(adapter_dir) / CONFIG_NAME, Path(adapter_dir) / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InputError(f"{path}: not found; a PEFT adapter folder has {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers/files
        raise InputError(f"{weights_path}: cannot read safetensors file ({err})") from None
    return vllm_verdict(config, shapes)


def check_vllm_main(adapters: list[str]) -> int:
    """``python -m engine.merge --check-vllm --adapter DIR``: print the verdict; 0 servable, 1 not."""
    if len(adapters) != 1:
        raise InputError(f"--check-vllm takes one --adapter, got {len(adapters)}")
    verdict = check_vllm(adapters[0])
    print(verdict.summary())
    for problem in verdict.problems[1:]:
        print(f"  also: {problem}")
    return 0 if verdict.servable else 1
