"""The tokenizer of an HF-style model folder, on the ``tokenizers`` library (no ``transformers``).

Reads ``tokenizer.json`` (the whole pipeline: normalizer, pre-tokenizer, model, post-processor,
decoder, added tokens) plus the side files that ``transformers`` reads:

* ``tokenizer_config.json`` (then ``special_tokens_map.json``): the text of ``bos_token``,
  ``eos_token``, ``pad_token``, ``unk_token``; ``add_bos_token`` / ``add_eos_token``; the
  ``chat_template`` (a string, or a list of ``{"name", "template"}`` whose ``default`` is used);
  ``clean_up_tokenization_spaces``.
* ``chat_template.jinja``: the chat template (it wins over the one in tokenizer_config.json).
* ``generation_config.json``: further stop ids (``eos_token_id`` may be a list) and fallbacks for
  ``bos_token_id`` / ``pad_token_id``.

``encode(text, add_special_tokens=True)`` adds what tokenizer.json's post-processor adds (BOS for
Llama 2/3, nothing for SmolLM2). That is what transformers 5 does too: with a tokenizer.json present
it drops ``add_bos_token`` / ``add_eos_token`` from tokenizer_config.json, so those flags only
describe the post-processor (the GGUF converter writes the two consistently).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _Backend

from models.chat_template import LLAMA2_TEMPLATE, render_chat
from models.errors import InputError

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: invalid JSON ({err})") from None


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _select_template(value, path: Path) -> str | None:
    """``chat_template`` is a string, or a list of named templates of which "default" is used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise InputError(f"{path}: chat_template lists {sorted(named)} but no 'default' template")
    raise InputError(f"{path}: chat_template must be a string or a list of {{name, template}}")


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Tokenizer:
    """Text <-> token ids and chat prompts for one model folder.

    Attributes: ``bos_token_id`` (None if the model has none), ``eos_token_id`` (the primary stop
    id), ``eos_token_ids`` (every stop id: the tokenizer's EOS, then generation_config's),
    ``pad_token_id`` (falls back to ``eos_token_id``), ``unk_token_id``, ``vocab_size`` (ids the
    tokenizer can produce, added tokens included: HF's ``len(tokenizer)``), ``chat_template``
    (the model's template or None; `apply_chat_template` then uses the Llama-2 format).
    """

    def __init__(self, backend: _Backend, config: dict, generation_config: dict | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.special_tokens = {name: _token_text(config.get(name)) for name in _SPECIAL_NAMES}
        gen = generation_config or {}

        self.bos_token_id = self._id_of("bos_token")
        if self.bos_token_id is None and _as_list(gen.get("bos_token_id")):
            self.bos_token_id = _as_list(gen.get("bos_token_id"))[0]
        gen_eos = _as_list(gen.get("eos_token_id"))
        primary = self._id_of("eos_token")
        self.eos_token_ids = list(dict.fromkeys(([primary] if primary is not None else []) + gen_eos))
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.unk_token_id = self._id_of("unk_token")
        pad = self._id_of("pad_token")
        if pad is None and _as_list(gen.get("pad_token_id")):
            pad = _as_list(gen.get("pad_token_id"))[0]
        self.pad_token_id = pad if pad is not None else self.eos_token_id

    def _id_of(self, name: str) -> int | None:
        text = self.special_tokens[name]
        return None if text is None else self.backend.token_to_id(text)

    @classmethod
    def from_dir(cls, folder) -> "Tokenizer":
        """Load the tokenizer files of ``folder`` (``tokenizer.json`` is required)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{folder}: no tokenizer.json (a tokenizers-library file is required)")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as err:  # the Rust parser's errors are all "this file is not valid"
            raise InputError(f"{path}: not a valid tokenizer.json ({err})") from None
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        for name in _SPECIAL_NAMES:
            if config.get(name) is None and special_map.get(name) is not None:
                config[name] = special_map[name]
        template = _select_template(config.get("chat_template"), folder / "tokenizer_config.json")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, config, _read_json(folder / "generation_config.json"), template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) are matched."""
        if not isinstance(text, str):
            raise InputError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list of ints or a 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return self._clean_up(text)

    def _clean_up(self, text: str) -> str:
        """HF's ``clean_up_tokenization_spaces`` (" ." -> "." ...): for WordPiece-style models only;
        transformers skips it for BPE unless forced, as it would delete real spaces."""
        if not self.config.get("clean_up_tokenization_spaces"):
            return text
        is_bpe = type(self.backend.model).__name__ == "BPE"
        if is_bpe and not self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
            return text
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(before, after)
        return text

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, **template_vars) -> str:
        """The prompt text of ``messages`` ([{"role", "content"}, ...]) under the model's chat
        template, or the Llama-2 ``[INST]`` format when it ships none. Encode the result with
        ``add_special_tokens=False``: templates write BOS themselves."""
        template = self.chat_template if self.chat_template is not None else LLAMA2_TEMPLATE
        special = {name: text for name, text in self.special_tokens.items() if text is not None}
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=special, **template_vars)


def load_tokenizer(name_or_path) -> Tokenizer:
    """The tokenizer of a local model folder, a preset name or a hub id."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        from models.loading import (
            resolve_model_dir,  # lazy: only names need the hub machinery
        )

        path = resolve_model_dir(name_or_path)
    return Tokenizer.from_dir(path)
