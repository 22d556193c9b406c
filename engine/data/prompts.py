"""Prompt-only data for online RL (GRPO): load, render, tokenize, length-check, and batch prompts.

    data = load_prompt_data("prompts.jsonl", tokenizer, max_prompt_len=512)
    data.train                      # list of `PromptSample` (prompt ids, the prompt as written, columns)
    loader = PromptLoader(data.train, batch_size=4, seed=0)
    batch = loader.batch(epoch=0, index=0)   # a `PromptBatch`: the recipe samples completions for it

Record forms (JSONL or JSON array, parsed by `engine.data.reading.read_records`, so a malformed line
raises ``InputError("file:line: ...")`` before any work), decided per record (TRL's "prompt-only"
dataset type):

* text            {"prompt": str, ...}: raw text, no chat template, tokenized as-is with BOS in
                  front when the tokenizer adds one (as the SFT "completion" format and the DPO
                  text form do).
* conversational  {"prompt": [messages], ...} (or one message object): rendered with the chat
                  template and ``add_generation_prompt=True``, so that the completion is the
                  assistant's reply (as DPO renders conversational prompts); a tokenizer without a
                  chat template raises `InputError` naming the file and line.

Every other field of a record is kept in `PromptSample.columns` (what reward functions receive as
keyword arguments, e.g. ``answer``); `PromptData.columns` names those present in every record.

A missing or mistyped prompt is an error naming file, line and field (with ``skip_invalid=True``,
``--skip-invalid-records``: a skip counted as ``skipped_missing_fields``); an empty prompt (only
whitespace, or messages without content) is skipped and counted. A file with no ``prompt`` key at
all raises `InputError` listing the keys seen. Nothing left raises `InputError`.

Length policy for a prompt of P > ``max_prompt_len`` = L tokens (tokenization is bounded: a long
prompt is encoded from its end, `engine.data.render.encode_tail`):

* ``truncate``: keep its LAST tokens (the question, and the chat template's generation prompt, are
  at the end). A prompt that starts with BOS keeps it: ``[BOS] + last L - 1 tokens``, because
  Llama models are trained with BOS at position 0 (many heads attend to it) and generating
  without it drifts; otherwise the last L tokens. Counted as ``truncated``.
* ``drop``: skip the prompt (counted); ``error``: raise naming the file and line.

Batches (`PromptLoader`): ``batch_size`` prompts per batch, consecutive in the epoch order of
`engine.data.batching.epoch_order` (a pure function of (seed, epoch)), the last batch of an epoch
possibly smaller; `engine.run.session.Run.windows` drives it with ``num_batches(epoch)`` and
``batch(epoch, index)``. No tensors: the recipe repeats each prompt and samples completions itself
(`engine.sampling.sample_completions`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from engine.data.batching import batch_groups, check_loader_options, epoch_order
from engine.data.formats import Invalid
from engine.data.preferences import parse_messages
from engine.data.reading import keys_seen, read_records
from engine.data.render import SpecialTokens, encode_head, encode_tail
from engine.data.samples import DataReport, check_length_options, invalid_record, load_with_eval
from engine.errors import InputError

PROMPT_KEY = "prompt"


@dataclass(frozen=True)
class PromptSample:
    """One prompt: its token ids (what the policy continues), the prompt as the record wrote it (a
    string, or a list of message dicts), the record's other fields, and where it came from."""

    prompt_ids: list[int]
    prompt: str | list[dict]
    columns: dict[str, Any]
    source: str  # "file:line"

    @property
    def conversational(self) -> bool:
        """Whether the prompt is a conversation (rendered with the chat template)."""
        return not isinstance(self.prompt, str)


@dataclass
class PromptReport(DataReport):
    """`DataReport` for prompt files: the prompt-specific reasons."""

    REASONS: ClassVar[tuple[str, ...]] = ("truncated", "dropped_too_long", "skipped_missing_fields",
                                          "skipped_empty_prompt")
    NOUN: ClassVar[str] = "prompts kept"

    skipped_empty_prompt: int = 0


@dataclass
class PromptData:
    train: list[PromptSample]
    eval: list[PromptSample]
    train_report: PromptReport
    eval_report: PromptReport | None  # None when the eval set was split off the training file

    def max_token_id(self) -> int:
        return max(max(s.prompt_ids) for s in self.train + self.eval)

    def columns(self) -> set[str]:
        """The column names present in every record (train and eval)."""
        samples = self.train + self.eval
        return set.intersection(*(set(s.columns) for s in samples)) if samples else set()

    def records_missing(self, column: str) -> list[str]:
        """The sources ("file:line") of the records without ``column``, in file order (train first)."""
        return [s.source for s in self.train + self.eval if column not in s.columns]


# ----------------------------------------------------------------------------- one record

def parse_prompt(record: dict) -> str | list[dict] | Invalid:
    """The record's prompt as kept in `PromptSample.prompt` (a string, or a list of messages; one
    message object becomes a list of one), or `Invalid` naming what is wrong with it."""
    if PROMPT_KEY not in record:
        return Invalid(f"field {PROMPT_KEY!r} is missing")
    value = record[PROMPT_KEY]
    if value is None:
        return Invalid(f"field {PROMPT_KEY!r} is null, expected a string or a list of messages")
    if isinstance(value, str):
        return value
    messages = parse_messages(value, PROMPT_KEY)
    if isinstance(messages, Invalid):
        return messages
    return [value] if isinstance(value, dict) else value


def is_empty(prompt: str | list[dict]) -> bool:
    """Nothing to condition on: only whitespace, or no message with content."""
    if isinstance(prompt, str):
        return not prompt.strip()
    return not any(m["content"].strip() for m in prompt)


def prompt_text(prompt: str | list[dict], tokenizer: Any, special: SpecialTokens, source: str) -> str:
    """The text the policy continues: the string itself, or the chat template's rendering of the
    messages with the generation prompt (the assistant's turn opened)."""
    if isinstance(prompt, str):
        return prompt
    if not special.has_chat_template:
        raise InputError(f"{source}: a conversational prompt (a list of messages) needs a chat template and "
                         "this tokenizer has none; use a prompt string instead")
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def tokenize_prompt(text: str, tokenizer: Any, special: SpecialTokens, max_len: int) -> tuple[list[int], bool]:
    """(ids, too_long): the prompt's tokens with BOS in front when the tokenizer adds one; when it
    has more than ``max_len`` tokens, ``too_long`` and ids cut as the ``truncate`` policy keeps them
    (module docstring: BOS, if the prompt starts with it, then its last tokens; ``max_len`` in all).

    Bounded work: at most the last ``max_len + 1`` tokens of the text and its first token are
    encoded (`encode_tail`, `encode_head`)."""
    tail, cut = encode_tail(tokenizer, text, max_len + 1)
    first = tail[:1] if not cut else encode_head(tokenizer, text, 1)[:1]
    bos = special.bos_id
    starts_with_bos = bos is not None and first == [bos]
    if special.adds_bos and not starts_with_bos:
        if not cut:
            tail = [bos, *tail]
        starts_with_bos = True
    if not cut and len(tail) <= max_len:
        return tail, False
    if starts_with_bos:
        return [bos, *tail[len(tail) - (max_len - 1):]], True
    return tail[len(tail) - max_len:], True


# ----------------------------------------------------------------------------- files

def load_prompts(path: str | Path, tokenizer: Any, *, max_prompt_len: int, length_policy: str = "truncate",
                 skip_invalid: bool = False) -> tuple[list[PromptSample], PromptReport]:
    """Parse, check, render, tokenize and length-check every record of one file."""
    check_length_options(length_policy, max_prompt_len, "max_prompt_len")
    path = Path(path)
    records = read_records(path)
    if not any(PROMPT_KEY in raw.value for raw in records):
        seen = keys_seen(records)
        raise InputError(f"{path}: not prompt data; keys seen: {seen}; expected a 'prompt' field (a string or "
                         "a list of messages) in each record")
    special = SpecialTokens.of(tokenizer)
    report = PromptReport(file=str(path), loaded=len(records))
    forms: Counter[str] = Counter()
    samples = []
    for raw in records:
        line, source = raw.line, f"{path}:{raw.where}"
        prompt = parse_prompt(raw.value)
        if isinstance(prompt, Invalid):
            if not skip_invalid:
                raise invalid_record(path, raw.where, prompt.problem,
                                     "a prompt is a string or a list of {role, content} messages")
            report.count("skipped_missing_fields", line)
            continue
        if is_empty(prompt):
            report.count("skipped_empty_prompt", line)
            continue
        ids, too_long = tokenize_prompt(prompt_text(prompt, tokenizer, special, source), tokenizer, special,
                                        max_prompt_len)
        if too_long:
            if length_policy == "error":
                raise InputError(f"{source}: prompt has more than max_prompt_len={max_prompt_len} tokens "
                                 "(length_policy='error'; use 'truncate' or 'drop')")
            if length_policy == "drop":
                report.count("dropped_too_long", line)
                continue
            report.count("truncated", line)
        columns = {k: v for k, v in raw.value.items() if k != PROMPT_KEY}
        sample = PromptSample(ids, prompt, columns, source)
        forms["conversational" if sample.conversational else "text"] += 1
        samples.append(sample)
    report.format = ", ".join(f"{form} ({n})" for form, n in sorted(forms.items())) or "prompt"
    report.kept = len(samples)
    if not samples:
        raise InputError(f"{path}: no usable prompts; {report.summary()}")
    return samples, report


def load_prompt_data(path: str | Path, tokenizer: Any, *, max_prompt_len: int, length_policy: str = "truncate",
                     eval_path: str | Path | None = None, eval_split: float = 0.0, seed: int = 0,
                     skip_invalid: bool = False) -> PromptData:
    """Training (and evaluation) prompts: from ``eval_path`` or an ``eval_split`` of ``path``."""
    def load_file(file: str | Path) -> tuple[list[PromptSample], PromptReport]:
        return load_prompts(file, tokenizer, max_prompt_len=max_prompt_len, length_policy=length_policy,
                            skip_invalid=skip_invalid)

    return PromptData(*load_with_eval(load_file, path, eval_path, eval_split, seed))


# ----------------------------------------------------------------------------- batches

@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one micro-batch: their indices in the loader's sample list, the samples, and
    the batch's place in the data order (``epoch``, ``index``: what `Parallel.micro_batches` seeds by)."""

    indices: list[int]
    samples: list[PromptSample]
    epoch: int
    index: int

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [s.prompt_ids for s in self.samples]


class PromptLoader:
    """Batches of ``batch_size`` prompts in a deterministic, resumable epoch order (every prompt once
    per epoch; the last batch may be smaller); ``batches(epoch, start)`` resumes exactly."""

    def __init__(self, samples: list[PromptSample], batch_size: int, seed: int = 0, shuffle: bool = True):
        check_loader_options("PromptLoader", "prompt", len(samples), batch_size, "padded", None, None)
        self.samples, self.batch_size, self.seed, self.shuffle = samples, batch_size, seed, shuffle
        self._planned: tuple[int | None, list[list[int]]] = (None, [])  # (epoch, its groups): once per epoch

    def order(self, epoch: int) -> list[int]:
        n = len(self.samples)
        return epoch_order(n, self.seed, epoch) if self.shuffle else list(range(n))

    def groups(self, epoch: int) -> list[list[int]]:
        """The sample indices of each batch of ``epoch`` (planned once per epoch)."""
        if self._planned[0] != epoch:
            self._planned = (epoch, batch_groups(self.order(epoch), [], self.batch_size))
        return self._planned[1]

    def num_batches(self, epoch: int) -> int:
        return len(self.groups(epoch))

    def batch(self, epoch: int, index: int) -> PromptBatch:
        """Batch ``index`` of ``epoch``."""
        indices = self.groups(epoch)[index]
        return PromptBatch(indices, [self.samples[i] for i in indices], epoch, index)

    def batches(self, epoch: int, start: int = 0) -> Iterator[PromptBatch]:
        """The batches of ``epoch`` from batch index ``start`` on."""
        for index in range(start, self.num_batches(epoch)):
            yield self.batch(epoch, index)


class StepRepeats:
    """A prompt loader whose every step's batches come ``repeats`` times in a row (GRPO's
    ``--num-iterations``: several optimizer steps on one batch of sampled completions).

    A step takes ``per_step`` consecutive batch positions (``grad_accum`` × ranks). Block k of the
    epoch, the underlying batches ``k·per_step … k·per_step + per_step − 1``, fills positions
    ``k·per_step·repeats …`` ``repeats`` times over: position i is underlying batch
    ``(i // (per_step·repeats))·per_step + i % per_step``. An epoch keeps whole blocks only (the at
    most ``per_step − 1`` batches left over are the next epoch's to draw in another order), so no
    step's repeats straddle an epoch.
    """

    def __init__(self, loader: PromptLoader, per_step: int, repeats: int):
        if loader.num_batches(0) < per_step:
            raise InputError(f"{loader.num_batches(0)} batches of prompts per epoch, fewer than the {per_step} "
                             "micro-batches of one step (--grad-accum × ranks): lower --batch-size or "
                             "--grad-accum")
        self.loader, self.per_step, self.repeats = loader, per_step, repeats

    def num_batches(self, epoch: int) -> int:
        return self.loader.num_batches(epoch) // self.per_step * self.per_step * self.repeats

    def source_index(self, index: int) -> int:
        """The underlying batch at position ``index`` of an epoch."""
        return index // (self.per_step * self.repeats) * self.per_step + index % self.per_step

    def batch(self, epoch: int, index: int) -> PromptBatch:
        return self.loader.batch(epoch, self.source_index(index))
