"""`LlamaConfig`: the one description of a Llama-family architecture, read from and written to HF's
``config.json``.

Covers Llama 2/3/3.1, Mistral (sliding window), TinyLlama and SmolLM2: grouped-query attention,
a ``head_dim`` that may differ from hidden/heads, tied or untied embeddings, optional q/k/v/o and
MLP biases, and RoPE of type ``default``, ``linear`` or ``llama3``. Both spellings of RoPE found in
``config.json`` files are accepted: the older ``rope_theta`` + ``rope_scaling`` and the newer
(transformers 5) ``rope_parameters = {"rope_type": ..., "rope_theta": ..., ...}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from models.errors import InputError

ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: multi-head attention (= num_attention_heads)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None for plain RoPE, else {"rope_type": "linear", "factor": f} or
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a token sees itself and the previous window-1 tokens
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Derived in __post_init__.
    n_rep: int = field(init=False)  # query heads per key/value head
    eos_token_ids: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)
        self.n_rep = self.num_attention_heads // self.num_key_value_heads
        eos = self.eos_token_id
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some init fields changed (derived fields are recomputed)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Read a transformers ``config.json`` dict (llama or mistral model_type).

        Raises `InputError` naming the field for anything missing or unsupported.
        """
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise InputError(f"model_type={model_type!r}: only 'llama' and 'mistral' are supported")
        theta, scaling = _rope_from_hf(hf)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise InputError(f"missing field(s) {', '.join(missing)}")
        kwargs = {k: hf[k] for k in required}
        for f in ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act", "bos_token_id",
                  "eos_token_id", "pad_token_id"):
            if hf.get(f) is not None:
                kwargs[f] = hf[f]
        if model_type == "mistral":  # Llama configs have no sliding window
            kwargs["sliding_window"] = hf.get("sliding_window")
        try:
            return cls(rope_theta=float(theta), rope_scaling=scaling, **kwargs)
        except (ValueError, TypeError) as err:
            raise InputError(str(err)) from None

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers (4.45+ and 5.x) loads as the same model."""
        mistral = self.sliding_window is not None
        hf: dict[str, Any] = {
            "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
            "model_type": "mistral" if mistral else "llama",
        }
        for f in dataclasses.fields(self):
            if f.init and f.name not in ("rope_scaling", "sliding_window"):
                hf[f.name] = getattr(self, f.name)
        hf["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        if mistral:
            hf["sliding_window"] = self.sliding_window
        return hf


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the old or the new (``rope_parameters``) spelling."""
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise InputError(f"rope_parameters must be a dict with rope_theta, got {params!r}")
        if set(params) & {"full_attention", "sliding_attention"}:
            raise InputError("per-layer-type rope_parameters are not supported")
        return params["rope_theta"], dict(params)
    return hf.get("rope_theta", 10000.0), hf.get("rope_scaling")


def _check_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Normalise to None (plain RoPE) or a dict with ``rope_type`` and exactly the keys it needs."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return None
    keys = ("factor",) if rope_type == "linear" else _LLAMA3_KEYS
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs {', '.join(missing)}")
    out: dict[str, Any] = {"rope_type": rope_type}
    out.update({k: scaling[k] for k in keys})
    if rope_type == "llama3" and out["low_freq_factor"] >= out["high_freq_factor"]:
        raise ValueError("llama3 rope scaling needs low_freq_factor < high_freq_factor")
    return out
