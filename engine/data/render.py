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

Bounded work: with ``max_tokens`` (the run's --max-len), no piece of text is tokenized beyond what
the sample can keep. A long text is encoded by prefixes cut at a space (`encode_head`), growing
until it yields more tokens than are needed plus a margin, so one 50 MB record costs memory in
proportion to --max-len, not to its length; the first tokens of a prefix cut at a word boundary
are those of the whole text. The result is then at most a few tokens over ``max_tokens``, which
tells the length policy that the sample is too long.

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
HEAD_CHARS_PER_TOKEN = 8  # first guess of characters per token when only a prefix of a text is needed
HEAD_MARGIN = 32          # tokens encoded past the limit, so that the cut cannot change the ones kept


def _cut_at_space(text: str, pos: int, keep_tail: bool = False) -> int:
    """A cut near ``pos`` at a space: for a head, the last space before ``pos`` (keep ``text[:cut]``);
    for a tail, the first space after it (keep ``text[cut:]``); ``pos`` itself when none is near."""
    if keep_tail:
        found = text.find(" ", pos, pos + (len(text) - pos) // 2)
        return found + 1 if found >= 0 else pos
    found = text.rfind(" ", pos // 2, pos)
    return found if found >= 0 else pos


def encode_head(tokenizer: Any, text: str, limit: int | None) -> list[int]:
    """The tokens of ``text``, or only its first ``limit + 1`` when it has more than ``limit``;
    ``limit`` None: all of them. Long texts are encoded by growing prefixes (module docstring)."""
    if limit is None:
        return _encode(tokenizer, text)
    chars = HEAD_CHARS_PER_TOKEN * (limit + HEAD_MARGIN)
    while chars < len(text):
        ids = _encode(tokenizer, text[:_cut_at_space(text, chars)])
        if len(ids) > limit + HEAD_MARGIN:
            return ids[:limit + 1]
        chars *= 2
    ids = _encode(tokenizer, text)
    return ids if len(ids) <= limit else ids[:limit + 1]


def encode_tail(tokenizer: Any, text: str, limit: int) -> tuple[list[int], bool]:
    """(the last ``limit`` tokens of ``text`` or all of them, whether tokens were left out), encoding
    growing suffixes cut after a space (a prompt cut from the left, `engine.data.preferences`)."""
    chars = HEAD_CHARS_PER_TOKEN * (limit + HEAD_MARGIN)
    while chars < len(text):
        ids = _encode(tokenizer, text[_cut_at_space(text, len(text) - chars, keep_tail=True):])
        if len(ids) > limit + HEAD_MARGIN:
            return ids[-limit:], True
        chars *= 2
    ids = _encode(tokenizer, text)
    return (ids[-limit:], True) if len(ids) > limit else (ids, False)


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


class _Budget:
    """Encodes the pieces of one sample in order, stopping once ``limit`` tokens are reached."""

    def __init__(self, tokenizer: Any, limit: int | None):
        self.tokenizer, self.left = tokenizer, None if limit is None else limit + 1

    def encode(self, text: str) -> tuple[list[int], bool]:
        """(tokens, cut): ``cut`` when the text went on beyond the budget."""
        if self.left is None:
            return _encode(self.tokenizer, text), False
        if self.left <= 0:
            return [], bool(text)
        ids = encode_head(self.tokenizer, text, self.left)
        cut = len(ids) > self.left
        ids = ids[:self.left]
        self.left -= len(ids)
        return ids, cut


def render_record(rec: Record, tokenizer: Any, special: SpecialTokens, *, train_on_prompt: bool = False,
                  source: str = "", max_tokens: int | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record; see the module docstring for the layout.

    With ``max_tokens``, a sample longer than that is returned with a few tokens more than
    ``max_tokens`` (not all of them): enough for the length policy to act on.
    """
    budget = _Budget(tokenizer, max_tokens)
    if rec.kind == "text":
        pieces = [(budget.encode(rec.text)[0], True), ([special.eos_id], True)]
    elif rec.kind == "completion":
        pieces = [(budget.encode(rec.prompt)[0], train_on_prompt), (budget.encode(rec.completion)[0], True),
                  ([special.eos_id], True)]
    else:
        pieces = _chat_pieces(rec, budget, special, train_on_prompt, source)
    ids = [t for piece, _ in pieces for t in piece]
    labels = [t if trained else IGNORE for piece, trained in pieces for t in piece]
    if special.adds_bos and ids[:1] != [special.bos_id]:
        ids, labels = [special.bos_id, *ids], [IGNORE, *labels]
    if labels:
        labels[0] = IGNORE
    return ids, labels


def _chat_pieces(rec: Record, budget: _Budget, special: SpecialTokens, train_on_prompt: bool,
                 source: str) -> list[tuple[list[int], bool]]:
    """Token pieces of a rendered chat, each flagged trained or not (prefix-rendering method)."""
    tokenizer = budget.tokenizer
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
        pieces.append((budget.encode(full[pos:start])[0], train_on_prompt))
        turn, cut = budget.encode(full[start:end])
        # a turn cut by the budget ends beyond what is kept: all of what is kept is trained on
        last_stop = None if cut else max((j for j, t in enumerate(turn) if t in special.stop_ids), default=None)
        if last_stop is None:
            pieces.append((turn, True))
        else:
            pieces += [(turn[: last_stop + 1], True), (turn[last_stop + 1:], train_on_prompt)]
        pos = end
    pieces.append((budget.encode(full[pos:])[0], train_on_prompt))
    if last_stop is None:  # the final assistant turn has no end-of-turn token: teach it to stop
        pieces.append(([special.eos_id], True))
    return pieces


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []
