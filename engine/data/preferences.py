"""Preference data for DPO: load, render, tokenize, check lengths, and batch chosen + rejected together.

    data = load_dpo_data("prefs.jsonl", tokenizer, max_len=512, eval_path="prefs_eval.jsonl")
    data.train                      # list of `PreferencePair` (prompt, chosen, rejected token ids)
    print(data.train_report.summary())

Record forms (JSONL or JSON array, parsed by `engine.data.reading.read_records`, so a malformed line
raises ``InputError("file:line: ...")`` before any work); the form is decided per record:

* text            {"prompt": str, "chosen": str, "rejected": str}: raw text, no chat template;
                  row = [BOS] prompt completion EOS.
* conversational  {"prompt": [messages], "chosen": ..., "rejected": ...} with chosen / rejected a
                  list of messages, one message ({"role": "assistant", "content": ...}) or a string
                  (the assistant's reply); rendered with the chat template.
* implicit prompt {"chosen": ..., "rejected": ...} without "prompt": two full conversations (message
                  lists) or two strings; their longest common prefix is the prompt (whole messages
                  for conversations; for strings, cut back to the last whitespace so that the
                  completions start on a word boundary).

Rendering a conversation: ``prompt_text = template(prompt, add_generation_prompt=True)`` and, per
completion, ``template(prompt + completion)`` must start with ``prompt_text`` (else `InputError`: the
template is not prefix-stable); the rest is the completion text. Its tokens are kept up to and
including the last end-of-turn token (any EOS id); without one, EOS is appended. The prompt is
tokenized once and shared by both rows; labels are -100 on the prompt and the completion tokens
on the completion (then shifted by the loss, as for SFT).

An optional numeric ``margin`` per record (TRL's reward-modelling field: how much better chosen is)
is kept on the pair for the reward model's loss (`engine.losses.reward`); DPO ignores it.

A missing or mistyped prompt / chosen / rejected / margin is an error naming file, line and field (with
``skip_invalid=True``, ``--skip-invalid-records``: a skip counted as ``skipped_missing_fields``).
Skipped and counted in a `PreferenceReport` (with the first line numbers): an empty completion,
identical chosen and rejected (also when they only became identical through truncation), an empty
prompt. Nothing left raises `InputError`. Tokenization is bounded by ``max_len``: a long prompt is
encoded from its end, long completions from their start (`engine.data.render.encode_head`).

Length policy for a pair whose prompt P plus longer completion C exceed ``max_len`` = L:

* ``truncate``: keep ``reserve = min(C, max(1, L // 2))`` completion tokens guaranteed; cut the
  prompt from the left to at most ``L − reserve`` tokens; then cut both completions on the right to
  ``L − len(prompt)``. So the prompt goes first, but never takes the whole row.
* ``drop``: skip the pair (counted); ``error``: raise naming the file and line.

Batches (`PairBatchLoader`, `engine.data.pair_batching`): B pairs per batch in a deterministic,
resumable epoch order, as ONE `Batch` of the 2B documents ``[c_1 … c_B, r_1 … r_B]`` so a single
forward scores both sides: 2B padded rows, or one padding-free row, or rows packed to ``max_len``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from engine.data.formats import Invalid
from engine.data.reading import keys_seen, read_records
from engine.data.render import IGNORE, SpecialTokens, encode_head, encode_tail
from engine.data.samples import (
    DataReport,
    Sample,
    check_length_options,
    invalid_record,
    load_with_eval,
)
from engine.errors import InputError

PREFERENCE_KEYS = ("chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """Token ids of one pair: the shared prompt and the two completions (EOS / end-of-turn included)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    source: str  # "file:line"
    margin: float = 0.0  # the record's optional "margin" (reward modelling)

    def rows(self) -> tuple[Sample, Sample]:
        """The chosen and the rejected sequence as SFT-style samples (labels -100 on the prompt)."""
        masked = [IGNORE] * len(self.prompt)
        return (Sample(self.prompt + self.chosen, masked + self.chosen, self.source),
                Sample(self.prompt + self.rejected, masked + self.rejected, self.source))


@dataclass
class PreferenceReport(DataReport):
    """`DataReport` for preference files, with the pair-specific skip reasons."""

    REASONS: ClassVar[tuple[str, ...]] = ("truncated", "dropped_too_long", "skipped_missing_fields",
                                          "skipped_empty_completion", "skipped_identical",
                                          "skipped_empty_prompt")
    NOUN: ClassVar[str] = "pairs kept"

    skipped_identical: int = 0
    skipped_empty_prompt: int = 0


@dataclass
class DPOData:
    train: list[PreferencePair]
    eval: list[PreferencePair]
    train_report: PreferenceReport
    eval_report: PreferenceReport | None  # None when the eval set was split off the training file

    def max_token_id(self) -> int:
        return max(max(p.prompt + p.chosen + p.rejected) for p in self.train + self.eval)


# ----------------------------------------------------------------------------- normalisation

@dataclass(frozen=True)
class _Parsed:
    """One record in a form-independent shape: text strings, or message tuples for "chat"."""

    form: str
    prompt: Any
    chosen: Any
    rejected: Any
    margin: float = 0.0


def parse_messages(value: Any, key: str) -> tuple[dict[str, str], ...] | Invalid:
    """A validated tuple of {"role", "content"} messages, or `Invalid` naming the first bad one."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return Invalid(f"field {key!r} must be a string or a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return Invalid(f"{key}[{i}] must be a message object, got {type(m).__name__}")
        for part in ("role", "content"):
            if not isinstance(m.get(part), str):
                return Invalid(f"{key}[{i}].{part} is missing" if part not in m else
                               f"{key}[{i}].{part} must be a string, got {type(m[part]).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _completion(value: Any, key: str) -> tuple[dict[str, str], ...] | Invalid:
    """A conversational completion: a message list, one message, or the assistant's text."""
    if isinstance(value, str):
        return ({"role": "assistant", "content": value},)
    return parse_messages(value, key)


def _split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): the common prefix, cut back to its last whitespace."""
    cut = len(os.path.commonprefix([chosen, rejected]))
    if cut < min(len(chosen), len(rejected)):
        space = max(chosen.rfind(" ", 0, cut + 1), chosen.rfind("\n", 0, cut + 1))
        cut = space if space > 0 else cut
    return chosen[:cut], chosen[cut:], rejected[cut:]


def parse_record(obj: dict) -> _Parsed | Invalid:
    """The record's form, parts and margin, or `Invalid` naming the missing or mistyped field."""
    for key in PREFERENCE_KEYS:
        if obj.get(key) is None:
            return Invalid(f"field {key!r} is missing")
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        return Invalid(f"field 'margin' must be a finite number, got {margin!r}")
    parsed = _parse_parts(obj)
    return parsed if isinstance(parsed, Invalid) else dataclasses.replace(parsed, margin=float(margin))


def _parse_parts(obj: dict) -> _Parsed | Invalid:
    chosen, rejected = obj["chosen"], obj["rejected"]
    if "prompt" not in obj:
        if isinstance(chosen, str) and isinstance(rejected, str):
            return _Parsed("implicit-text", *_split_text(chosen, rejected))
        c, r = parse_messages(chosen, "chosen"), parse_messages(rejected, "rejected")
        for part in (c, r):
            if isinstance(part, Invalid):
                return part
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        return _Parsed("implicit-conversational", c[:k], c[k:], r[k:])
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        for key in PREFERENCE_KEYS:
            if not isinstance(obj[key], str):
                return Invalid(f"field {key!r} must be a string like the prompt, got {type(obj[key]).__name__}")
        return _Parsed("text", prompt, chosen, rejected)
    parts = (parse_messages(prompt, "prompt"), _completion(chosen, "chosen"), _completion(rejected, "rejected"))
    for part in parts:
        if isinstance(part, Invalid):
            return part
    return _Parsed("conversational", *parts)


def _is_empty(part: Any) -> bool:
    if isinstance(part, str):
        return not part.strip()
    return not any(m["content"].strip() for m in part)


def check_parsed(parsed: _Parsed) -> str | None:
    """The skip reason for a parsed record that cannot be trained on, else None."""
    if _is_empty(parsed.prompt):
        return "skipped_empty_prompt"
    if _is_empty(parsed.chosen) or _is_empty(parsed.rejected):
        return "skipped_empty_completion"
    if parsed.chosen == parsed.rejected:
        return "skipped_identical"
    return None


# ----------------------------------------------------------------------------- tokenization

def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _end_at_stop(ids: list[int], special: SpecialTokens) -> list[int]:
    """Keep tokens through the last end-of-turn token (ChatML's trailing newline goes); else add EOS."""
    last = max((j for j, t in enumerate(ids) if t in special.stop_ids), default=None)
    return ids[: last + 1] if last is not None else ids + [special.eos_id]


def tokenize_pair(parsed: _Parsed, tokenizer: Any, special: SpecialTokens, source: str,
                  max_len: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) of a checked record; see the module docstring.

    With ``max_len``: at most the prompt's last ``max_len`` tokens and each completion's first
    ``max_len + 1`` (then `fit_length` cuts them as the length policy says).
    """
    prompt, (chosen, rejected) = tokenize_completions(parsed.form, parsed.prompt, [parsed.chosen, parsed.rejected],
                                                      tokenizer, special, source, max_len)
    return prompt, chosen, rejected


def tokenize_completions(form: str, prompt: Any, completions: list[Any], tokenizer: Any, special: SpecialTokens,
                         source: str, max_len: int | None = None) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, ids of each completion) for a prompt and completions of one parsed ``form``
    (`parse_record`), rendered as `tokenize_pair` renders a pair's two sides: what the reward
    model scores (`engine.reward_model`) is rendered as it was trained."""
    def completion(ids_of_text: str, end_with_eos: bool) -> list[int]:
        ids = encode_head(tokenizer, ids_of_text, max_len)
        if max_len is not None and len(ids) > max_len:
            return ids  # cut: its end is beyond what is kept
        return ids + [special.eos_id] if end_with_eos else _end_at_stop(ids, special)

    if form.endswith("text"):
        prompt_text = prompt
        ids = [completion(t, end_with_eos=True) for t in completions]
    else:
        if not special.has_chat_template:
            raise InputError(f"{source}: conversational preference data needs a chat template and this "
                             "tokenizer has none; use prompt/chosen/rejected strings instead")
        messages = [dict(m) for m in prompt]
        prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = []
        for side in completions:
            full = tokenizer.apply_chat_template(messages + [dict(m) for m in side], add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise InputError(f"{source}: the chat template is not prefix-stable (the rendered prompt is "
                                 "not a prefix of the rendered conversation); use prompt/chosen/rejected strings")
            ids.append(completion(full[len(prompt_text):], end_with_eos=False))
    prompt_ids, cut = encode_tail(tokenizer, prompt_text, max_len) if max_len else (_encode(tokenizer, prompt_text), False)
    if special.adds_bos and not cut and prompt_ids[:1] != [special.bos_id]:
        prompt_ids = [special.bos_id, *prompt_ids]
    return prompt_ids, ids


def fit_length(prompt: list[int], chosen: list[int], rejected: list[int],
               max_len: int) -> tuple[list[int], list[int], list[int]]:
    """The `truncate` policy: cut the prompt from the left first (keeping ``reserve`` completion
    tokens), then the completions on the right, so that prompt + each completion <= max_len."""
    longest = max(len(chosen), len(rejected))
    reserve = min(longest, max(1, max_len // 2))
    keep_prompt = min(len(prompt), max_len - reserve)
    prompt = prompt[len(prompt) - keep_prompt:]
    room = max_len - len(prompt)
    return prompt, chosen[:room], rejected[:room]


# ----------------------------------------------------------------------------- files

def load_preference_pairs(path: str | Path, tokenizer: Any, *, max_len: int | None = None,
                          length_policy: str = "truncate",
                          skip_invalid: bool = False) -> tuple[list[PreferencePair], PreferenceReport]:
    """Parse, check, tokenize and length-check every record of one file."""
    check_length_options(length_policy, max_len)
    path = Path(path)
    records = read_records(path)
    if not any(k in raw.value for raw in records for k in PREFERENCE_KEYS):
        seen = keys_seen(records)
        raise InputError(f"{path}: not preference data; keys seen: {seen}; expected prompt/chosen/rejected "
                         "(strings or message lists) or chosen/rejected conversations")
    special = SpecialTokens.of(tokenizer)
    report = PreferenceReport(file=str(path), loaded=len(records))
    forms: Counter[str] = Counter()
    pairs = []
    for raw in records:
        line, source = raw.line, f"{path}:{raw.where}"
        parsed = parse_record(raw.value)
        if isinstance(parsed, Invalid):
            if not skip_invalid:
                raise invalid_record(path, raw.where, parsed.problem, "a preference pair needs prompt, chosen "
                                     "and rejected (strings or messages), or two conversations")
            report.count("skipped_missing_fields", line)
            continue
        reason = check_parsed(parsed)
        if reason is not None:
            report.count(reason, line)
            continue
        forms[parsed.form] += 1
        prompt, chosen, rejected = tokenize_pair(parsed, tokenizer, special, source, max_len)
        longest = len(prompt) + max(len(chosen), len(rejected))
        if max_len is not None and longest > max_len:
            if length_policy == "error":
                raise InputError(f"{source}: pair has more than max_len={max_len} tokens (prompt + longer "
                                 "completion; length_policy='error'; use 'truncate' or 'drop')")
            if length_policy == "drop":
                report.count("dropped_too_long", line)
                continue
            prompt, chosen, rejected = fit_length(prompt, chosen, rejected, max_len)
            if chosen == rejected:
                report.count("skipped_identical", line)
                continue
            report.count("truncated", line)
        pairs.append(PreferencePair(prompt, chosen, rejected, source, parsed.margin))
    report.format = ", ".join(f"{form} ({n})" for form, n in sorted(forms.items())) or "preference"
    report.kept = len(pairs)
    if not pairs:
        raise InputError(f"{path}: no usable preference pairs; {report.summary()}")
    return pairs, report


def load_dpo_data(path: str | Path, tokenizer: Any, *, max_len: int | None = None,
                  length_policy: str = "truncate", eval_path: str | Path | None = None,
                  eval_split: float = 0.0, seed: int = 0, skip_invalid: bool = False) -> DPOData:
    """Training (and evaluation) pairs: from ``eval_path`` or an ``eval_split`` of ``path``."""
    def load_file(file: str | Path) -> tuple[list[PreferencePair], PreferenceReport]:
        return load_preference_pairs(file, tokenizer, max_len=max_len, length_policy=length_policy,
                                     skip_invalid=skip_invalid)

    return DPOData(*load_with_eval(load_file, path, eval_path, eval_split, seed))


# Batches of pairs live in `engine.data.pair_batching`; imported here, at the end, because that
# module names `PreferencePair` (defined above) and callers know PairBatchLoader from here.
from engine.data.pair_batching import PairBatchLoader  # noqa: F401
