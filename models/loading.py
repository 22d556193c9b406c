"""Find a model folder, read its ``config.json``, and load its safetensors weights into our classes.

Loading builds the model on the meta device (no memory), then reads tensor after tensor from the
(possibly sharded) safetensors files, converts each to the requested dtype and device and assigns
it as the module's parameter: a 7B model never exists twice in memory. The per-tensor work (reading
the mapped file, the cast, the finiteness check, NF4 quantization on the target device) runs on a
few threads (`load_workers`, `models.ordered_map`), a bounded number of tensors ahead of the
assignments, which stay in file order. `expected_tensors` is the
one map from HF tensor names to ours; our module tree mirrors transformers' names, so the map is the
identity on names and its job is to list every tensor with its shape, derived from the config.
Weights are read with safetensors only; pickled ``.bin`` files are never opened, and every file a
folder names (the shards of an index) must lie inside that folder.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from kernels.frozen import QuantizedWeight, is_quantized
from models.bnb8_checkpoint import BnbInt8Groups
from models.bnb_checkpoint import BnbNF4Groups, bnb_checkpoint_format
from models.config import LlamaConfig
from models.errors import InputError
from models.llama import LlamaForCausalLM, rope_inv_freq
from models.ordered_map import ordered_map
from models.presets import PRESETS
from models.quantized import FORMATS, quantize_weight, quantized_linear, should_quantize
from models.safetensors_io import save_safetensors
from models.skeleton import meta_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Tensors some checkpoints carry that we recompute or share: RoPE buffers of old exports.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

Transform = Callable[[str, torch.Tensor], "torch.Tensor | QuantizedWeight"]


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; else a preset name or a hub id ``org/name``, downloaded (weights,
    configs, tokenizer files only) with huggingface_hub, which honours ``HF_HUB_OFFLINE``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in PRESETS:
        hub_id = PRESETS[name].hub_id
    elif _HUB_ID.match(name) and not path.exists():
        hub_id = name
    else:
        raise InputError(f"model {name!r}: not a folder, a preset ({', '.join(PRESETS)}) or a hub id")
    return _download(hub_id, name)


def _download(hub_id: str, name: str) -> Path:
    from huggingface_hub import (
        snapshot_download,  # imported here: only downloads need it
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except Exception as err:  # network, auth, offline-and-not-cached: all the user's to fix
        how = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "download failed"
        raise InputError(f"model {name!r} (hub id {hub_id}): {how}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None


def read_config(model_dir: Path) -> LlamaConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(f"{model_dir}: no config.json (expected a Hugging Face model folder)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    try:
        return LlamaConfig.from_hf_config(hf)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds: HF name (= our state_dict key) -> shape."""
    H, I, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        for proj, (out_f, in_f) in {"q_proj": (q_out, H), "k_proj": (kv_out, H),
                                    "v_proj": (kv_out, H), "o_proj": (H, q_out)}.items():
            shapes[p + f"self_attn.{proj}.weight"] = (out_f, in_f)
            if cfg.attention_bias:
                shapes[p + f"self_attn.{proj}.bias"] = (out_f,)
        for proj, (out_f, in_f) in {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}.items():
            shapes[p + f"mlp.{proj}.weight"] = (out_f, in_f)
            if cfg.mlp_bias:
                shapes[p + f"mlp.{proj}.bias"] = (out_f,)
    return shapes


def contained_file(folder: Path, name: str, named_by: Path) -> Path:
    """``folder / name``, refused (InputError naming ``named_by``) unless it resolves inside ``folder``:
    a file a model folder names may not be an absolute path, climb out with ``..`` or be a symlink
    to somewhere else."""
    root = folder.resolve()
    path = (folder / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root) or path == root:
        raise InputError(f"{named_by}: {name!r} points outside the model folder {folder}; "
                         "shards must be files inside it")
    return folder / name


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index lists, or model.safetensors."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"{index}: not a safetensors index with a weight_map ({err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise InputError(f"{index}: weight_map must map tensor names to shard file names")
        files = [contained_file(model_dir, f, index) for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{index}: shard(s) missing from {model_dir}: {', '.join(missing)}")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if len(found) == 1:
        return [model_dir / found[0]]
    pickled = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = f" (found {', '.join(pickled)}: pickled weights are never loaded; convert to safetensors)" if pickled else ""
    raise InputError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def load_weights(model: LlamaForCausalLM, model_dir: Path, dtype: torch.dtype, device: torch.device | str,
                 transform: Transform | None = None) -> None:
    """Assign every checkpoint tensor to ``model`` (built on meta), one tensor at a time.

    Each tensor is checked (known name, shape, finite after the dtype cast), moved to ``device``
    in ``dtype``, passed through ``transform(name, tensor)`` (a hook for per-layer quantization,
    called on worker threads: it must not touch shared state), and set as the module's parameter.
    These per-tensor steps run `load_workers` at a time (`models.ordered_map`); the assignments
    stay in file order on the calling thread. Raises `InputError` naming tensor and file on any
    mismatch. A pre-quantized bitsandbytes NF4 or 8-bit checkpoint (config.json's ``quantization_config``)
    has its quantized linears rebuilt from their bnb keys as `NF4Linear`s or `Int8Linear`s (dequantized
    to ``dtype``), whatever ``transform`` does.
    """
    expected = expected_tensors(model.config)
    seen: dict[str, Path] = {}
    files = weight_files(model_dir)
    fmt = bnb_checkpoint_format(model_dir)  # None, or the pre-quantized bnb format whose keys it holds
    bnb = (BnbNF4Groups(files, expected, device) if fmt == "nf4"
           else BnbInt8Groups(files, expected, device, dtype) if fmt == "int8" else None)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # worker threads start on GPU 0: name the GPU
        device = torch.device("cuda", torch.cuda.current_device())
    workers = load_workers(device)
    # One step per shard; shown only on a terminal (disable=None), a 7B model takes a while.
    for file in tqdm(files, desc=f"loading {model_dir.name}", unit="shard", disable=None, leave=False):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                dense = []
                for name in f.keys():
                    if _IGNORED.match(name) or (name == "lm_head.weight" and model.config.tie_word_embeddings):
                        continue
                    if bnb is not None and bnb.claims(name):
                        if (done := bnb.add(name, f.get_tensor(name), file)) is not None:
                            _assign(model, *done)
                        continue
                    if name not in expected:
                        raise InputError(f"{file}: unexpected tensor {name!r} for this config.json")
                    if name in seen:
                        raise InputError(f"{file}: tensor {name!r} also in {seen[name].name}")
                    seen[name] = file
                    dense.append(name)
                prepare = functools.partial(_prepared_tensor, shapes=expected, file=file, dtype=dtype,
                                            device=device, transform=transform)
                # get_tensor maps the file (reads nothing); reading, cast, check and transform run on the workers.
                items = ((name, f.get_tensor(name)) for name in dense)
                for name, tensor in zip(dense, ordered_map(prepare, items, workers)):
                    _assign(model, name, tensor)
        except SafetensorError as err:
            raise InputError(f"{file}: unreadable safetensors file (truncated or corrupt?): {err}") from None
    if bnb is not None:
        seen.update(bnb.finish())
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(f"{model_dir}: tensor(s) missing from the checkpoint: {', '.join(missing[:3])}{more}")
    model.tie_weights()
    model.model.inv_freq = rope_inv_freq(model.config, device)  # the non-persistent buffer, off meta


MAX_LOAD_WORKERS = 4


def load_workers(device: torch.device) -> int:
    """Threads for the per-tensor steps of loading: up to 4 (transformers' loader uses as many), one
    per CPU core this process may use; for a CPU target, one per ``torch.get_num_threads()`` cores,
    so that torch's intra-op threads and ours do not oversubscribe the cores (1: no thread)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        cores //= max(1, torch.get_num_threads())
    return max(1, min(MAX_LOAD_WORKERS, cores))


def _prepared_tensor(item: tuple[str, torch.Tensor], *, shapes: dict[str, tuple[int, ...]], file: Path,
                     dtype: torch.dtype, device: torch.device, transform: Transform | None) -> torch.Tensor | QuantizedWeight:
    """One worker's step: a mapped checkpoint tensor checked, cast, moved and transformed."""
    name, tensor = item
    tensor = _checked_tensor(tensor, name, shapes[name], file, dtype, device)
    return transform(name, tensor) if transform else tensor


def _checked_tensor(t: torch.Tensor, name: str, shape: tuple[int, ...], file: Path,
                    dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise InputError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape} from config.json")
    if not t.is_floating_point():
        raise InputError(f"{file}: tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype")
    t = t.to(device=device, dtype=dtype)  # copy to the device first, then convert there
    if not all_finite(t):
        raise InputError(f"{file}: tensor {name!r} has non-finite values (NaN or inf in {dtype})")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, by one fused reduction on ``t``'s device.

    ``(lo, hi) = aminmax(t)`` in ``t``'s own dtype: min and max propagate NaN, and an infinity
    is the max or the min, so ``t`` is finite iff ``lo`` and ``hi`` are. Unlike a sum it cannot
    overflow (a sum of finite fp16 values may), and it reads ``t`` once at memory speed, without
    an fp32 copy or an (n,) bool mask (the old fp32 sum of a bf16 tensor ran at 0.4 GB/s on a CPU).
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def _assign(model: nn.Module, name: str, tensor: torch.Tensor | QuantizedWeight) -> None:
    """Set a parameter; a quantized weight replaces its whole ``nn.Linear`` by the
    `models.quantized.QuantizedLinear` of its format."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if is_quantized(tensor):
        quantized = quantized_linear(tensor)
        quantized.bias = module.bias  # None, the loaded bias, or a meta placeholder assigned later
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)
        return
    setattr(module, attr, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


QUANTIZE_CHOICES = (None, *FORMATS)


def load_model(name_or_path: str | os.PathLike, *, quantize: str | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """A model folder, preset name or hub id -> `LlamaForCausalLM` in ``dtype`` on ``device``, eval mode.

    ``quantize="nf4"`` (QLoRA) stores every decoder-block linear in NF4, quantizing each weight as
    it is read, so the dense model never exists whole on the device (``dtype`` is then the
    compute dtype and the dtype the weights are quantized from); ``"int8"`` stores them as
    per-row absmax int8 and ``"fp8"`` as per-row scaled e4m3 (`models.quantized.FORMATS`). A
    pre-quantized bitsandbytes folder loads its quantized linears as NF4 (4-bit) or int8 (8-bit,
    LLM.int8's ``weight`` and ``SCB`` as they are) whatever ``quantize`` says (the checkpoint decides).
    Adapters go on top with `engine.adapters.load_adapter` (or `engine.adapters.load_adapted_model`).
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InputError(f"dtype {dtype}: expected torch.float32, torch.bfloat16 or torch.float16")
    if quantize not in QUANTIZE_CHOICES:
        raise InputError(f"quantize={quantize!r}: expected None or one of {', '.join(map(repr, FORMATS))}")
    model_dir = resolve_model_dir(name_or_path)
    cfg = read_config(model_dir)
    model = meta_model(cfg)
    transform = None if quantize is None else functools.partial(_quantize_tensor, quantize)
    load_weights(model, model_dir, dtype, device, transform=transform)
    return model.eval()


def _quantize_tensor(fmt: str, name: str, tensor: torch.Tensor) -> torch.Tensor | QuantizedWeight:
    """The per-tensor hook of quantized loading: the linears `should_quantize` selects become ``fmt``."""
    return quantize_weight(fmt, tensor) if should_quantize(name) else tensor


def save_model(model: LlamaForCausalLM, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
               extra_config: dict | None = None) -> Path:
    """Write ``config.json`` and safetensors weights (sharded with an index when over
    ``max_shard_bytes``) in HF layout, so both `load_model` and transformers read them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    names = list(expected_tensors(model.config))
    dtype = str(state[names[0]].dtype).removeprefix("torch.")
    config = {**model.config.to_hf_config(), "torch_dtype": dtype, **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_weights({n: state[n] for n in names}, out, max_shard_bytes=max_shard_bytes)
    return out


def write_weights(tensors: dict[str, torch.Tensor], out: Path, *, max_shard_bytes: int) -> None:
    """``tensors`` in their order into ``out/model.safetensors``, or, over ``max_shard_bytes``, into
    shards ``model-0000i-of-0000n.safetensors`` (a new shard starts before the tensor that would
    overflow it) with ``model.safetensors.index.json`` (the weight map and the total size)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_safetensors({n: t.contiguous() for n, t in tensors.items()}, out / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors({n: tensors[n].contiguous() for n in shard}, out / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
