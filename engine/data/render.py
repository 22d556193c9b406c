"""Tokenize a `Record` into ``input_ids`` and ``labels`` (aligned, -100 = no loss).

Labels are built explicitly, token by token, never by masking pad ids, so an EOS stays a label
even when the tokenizer's pad id equals its EOS id. They are aligned with ``input_ids``: the loss
shifts them (hidden state t predicts ``labels[t + 1]``). ``labels[0]`` is always -100: nothing
precedes the first token, and in a packed row it would otherwise be predicted from the previous
document.

* text:        [BOS] text EOS                 labels: text EOS
* completion:  [BOS] prompt completion EOS    labels: completion EOS (prompt too if train_on_prompt)
  prompt and completion are tokenized separately, so the completion starts on a token boundary.
* chat:        the chat template's rendering; labels: each assistant turn's tokens up to and
  including its end-of-turn token (any of the tokenizer's EOS ids).

[BOS] is prepended when the tokenizer adds one itself (``encode(x, add_special_tokens=True)``
starts with it) and the text does not start with it already (templates often write it).

Finding assistant spans with any template: render the conversation prefix by prefix. For each
assistant turn i, ``render(m[:i], add_generation_prompt=True)`` ends where the turn's own text
starts and ``render(m[:i+1])`` ends where it stops; both must be string prefixes of the full
rendering ``render(m)``. The full text is cut at those offsets and each piece tokenized on its
own (so spans fall on token boundaries); text after the turn's last end-of-turn token inside the
span (ChatML's trailing newline) is not trained on. Assumption: the template is prefix-stable,
i.e. rendering a prefix of a conversation gives a prefix of the rendered whole. Templates that
rewrite earlier turns (e.g. drop past reasoning) are not, and raise `InputError`. If the final
assistant turn contains no end-of-turn token, EOS is appended and trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.data.formats import Record
from engine.errors import InputError

IGNORE = -100


@dataclass(frozen=True)
class SpecialTokens:
    """What rendering needs to know about a tokenizer's special tokens, computed once."""

    bos_id: int | None
    eos_id: int
    stop_ids: frozenset[int]  # end-of-turn ids: eos plus the tokenizer's other EOS ids
    adds_bos: bool            # the tokenizer prepends BOS when asked for special tokens
    has_chat_template: bool

    @classmethod
    def of(cls, tokenizer: Any) -> "SpecialTokens":
        bos = getattr(tokenizer, "bos_token_id", None)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise InputError("the tokenizer has no EOS token; SFT needs one to end each sample")
        stops = frozenset([eos, *(getattr(tokenizer, "eos_token_ids", None) or [])])
        with_special = tokenizer.encode("a", add_special_tokens=True)
        without = tokenizer.encode("a", add_special_tokens=False)
        adds_bos = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
        template = getattr(tokenizer, "chat_template", None)
        return cls(bos, eos, stops, adds_bos, bool(template))


def render_record(rec: Record, tokenizer: Any, special: SpecialTokens, *,
                  train_on_prompt: bool = False, source: str = "") -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record; see the module docstring for the layout."""
    if rec.kind == "text":
        pieces = [(tokenizer.encode(rec.text, add_special_tokens=False), True),
                  ([special.eos_id], True)]
    elif rec.kind == "completion":
        pieces = [(tokenizer.encode(rec.prompt, add_special_tokens=False), train_on_prompt),
                  (tokenizer.encode(rec.completion, add_special_tokens=False), True),
                  ([special.eos_id], True)]
    else:
        pieces = _chat_pieces(rec, tokenizer, special, train_on_prompt, source)
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if trained else IGNORE for piece, trained in pieces for t in piece]
    if special.adds_bos and ids[:1] != [special.bos_id]:
        ids, labels = [special.bos_id, *ids], [IGNORE, *labels]
    if labels:
        labels[0] = IGNORE
    return ids, labels


def _chat_pieces(rec: Record, tokenizer: Any, special: SpecialTokens, train_on_prompt: bool,
                 source: str) -> list[tuple[list[int], bool]]:
    """Token pieces of a rendered chat, each flagged trained or not (prefix-rendering method)."""
    if not special.has_chat_template:
        raise InputError(f"{source}: conversational data needs a chat template and this "
                         "tokenizer has none; use prompt/completion or text format instead")
    messages = [dict(m) for m in rec.messages]
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    cuts = []  # (start, end) character spans of assistant turns in `full`
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise InputError(f"{source}: the chat template is not prefix-stable (rendering the "
                             f"first {i} messages is not a prefix of rendering all of them), so "
                             "assistant turns cannot be located; use prompt/completion format")
        cuts.append((len(before), len(through)))
    pieces: list[tuple[list[int], bool]] = []
    pos, last_stop = 0, None
    for start, end in cuts:
        pieces.append((_encode(tokenizer, full[pos:start]), train_on_prompt))
        turn = _encode(tokenizer, full[start:end])
        last_stop = max((j for j, t in enumerate(turn) if t in special.stop_ids), default=None)
        if last_stop is None:
            pieces.append((turn, True))
        else:
            pieces += [(turn[: last_stop + 1], True), (turn[last_stop + 1:], train_on_prompt)]
        pos = end
    pieces.append((_encode(tokenizer, full[pos:]), train_on_prompt))
    if last_stop is None:  # the final assistant turn has no end-of-turn token: teach it to stop
        pieces.append(([special.eos_id], True))
    return pieces


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []
