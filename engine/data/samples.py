"""SFT data: load a file, tokenize and mask every sample, apply the length policy, split.

    data = load_sft_data("train.jsonl", tokenizer, max_len=512, eval_split=0.1, seed=42)
    data.train, data.eval          # lists of `Sample` (input_ids, labels, source "file:line")
    print(data.train_report.summary())

Order of work, so that bad input fails before anything expensive: parse the whole file (a
malformed line raises `InputError` naming file and line), detect the format, normalise every
record, and only then tokenize. A record with a missing or mistyped field is an error naming file,
line and field, or, with ``skip_invalid=True`` (``--skip-invalid-records``), a skip counted as
``skipped_missing_fields``. Samples that cannot be trained on (an empty completion, no trainable
token left) are skipped and counted in a `DataReport` (with the first few line numbers per
reason); a file with nothing left raises. Tokenization is bounded by ``max_len``
(`engine.data.render`): memory follows --max-len, not the length of a record.

Length policy for samples longer than ``max_len`` tokens: "truncate" keeps the first ``max_len``
tokens (a sample left with no trainable token is then skipped as such), "drop" skips it, "error"
raises naming the file and line of the first one. Formats, rendering and masking are described in
`engine.data.formats` and `engine.data.render`; batching and packing in `engine.data.batching`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from engine.data.formats import (
    FORMAT_FIELDS,
    SKIP_EMPTY,
    Invalid,
    detect_format,
    to_record,
)
from engine.data.reading import read_records
from engine.data.render import IGNORE, SpecialTokens, render_record
from engine.errors import InputError

LENGTH_POLICIES = ("truncate", "drop", "error")
FIRST_LINES_KEPT = 5


@dataclass(frozen=True)
class Sample:
    """One tokenized sample: ``input_ids`` and aligned ``labels`` (-100 = no loss), same length."""

    input_ids: list[int]
    labels: list[int]
    source: str  # "file:line", for reports and error messages

    @property
    def loss_tokens(self) -> int:
        """Labels the loss is taken on (not -100)."""
        return sum(label != IGNORE for label in self.labels)


@dataclass
class DataReport:
    """What happened to the records of one file; ``lines[reason]`` holds the first few lines.

    Every count in ``REASONS`` is a field; `engine.data.preferences.PreferenceReport` adds its own.
    """

    REASONS: ClassVar[tuple[str, ...]] = ("truncated", "dropped_too_long", "skipped_missing_fields",
                                          "skipped_empty_completion", "skipped_no_trainable_tokens")
    NOUN: ClassVar[str] = "kept"

    file: str
    format: str = ""
    loaded: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    skipped_missing_fields: int = 0
    skipped_empty_completion: int = 0
    skipped_no_trainable_tokens: int = 0
    lines: dict[str, list[int]] = field(default_factory=dict)

    def count(self, reason: str, line: int) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        first = self.lines.setdefault(reason, [])
        if len(first) < FIRST_LINES_KEPT:
            first.append(line)

    def summary(self) -> str:
        parts = [f"{self.file} ({self.format}): {self.loaded} loaded, {self.kept} {self.NOUN}"]
        for reason in self.REASONS:
            n = getattr(self, reason)
            if n:
                first = self.lines[reason]
                lines = ", ".join(map(str, first)) + (", ..." if n > len(first) else "")
                parts.append(f"{n} {reason.replace('_', ' ')} (lines {lines})")
        return "; ".join(parts)


def check_length_options(length_policy: str, max_len: int | None, name: str = "max_len") -> None:
    """InputError for a length policy no loader knows, or a length limit (``name``) under 2 tokens."""
    if length_policy not in LENGTH_POLICIES:
        raise InputError(f"length_policy={length_policy!r}; expected one of {', '.join(LENGTH_POLICIES)}")
    if max_len is not None and max_len < 2:
        raise InputError(f"{name}={max_len}; expected at least 2 tokens")


def check_vocabulary(samples: list[Sample], vocab_size: int, flag: str, path: str) -> None:
    """Every token id of ``samples`` fits the model's embedding (InputError naming the sample)."""
    for sample in samples:
        if max(sample.input_ids) >= vocab_size:
            raise InputError(f"{sample.source}: token id {max(sample.input_ids)} is outside the model's vocabulary "
                             f"of {vocab_size} ({flag} {path})")


def invalid_record(path: Path, where: str, problem: str, what: str) -> InputError:
    """The error for a record that its file's format cannot read (strict mode)."""
    return InputError(f"{path}:{where}: {problem} ({what}); fix the record, or pass --skip-invalid-records "
                      "to skip such records (they are counted in data_report.json)")


@dataclass
class SFTData:
    train: list[Sample]
    eval: list[Sample]
    train_report: DataReport
    eval_report: DataReport | None  # None when the eval set was split off the training file

    def max_token_id(self) -> int:
        return max(max(s.input_ids) for s in self.train + self.eval)


def load_samples(path: str | Path, tokenizer: Any, *, format: str | None = None,
                 max_len: int | None = None, length_policy: str = "truncate",
                 train_on_prompt: bool = False, skip_invalid: bool = False,
                 limit: int | None = None) -> tuple[list[Sample], DataReport]:
    """Parse, detect, normalise, tokenize and length-check every record of one file; with ``limit``,
    only the first ``limit`` usable samples are tokenized and returned (every record is still parsed
    and checked)."""
    check_length_options(length_policy, max_len)
    path = Path(path)
    records = read_records(path)
    special = SpecialTokens.of(tokenizer)
    report = DataReport(file=str(path), format=detect_format(records, path, format),
                        loaded=len(records))
    normalised = []
    for raw in records:
        rec = to_record(raw.value, raw.line, report.format, special.has_chat_template)
        if isinstance(rec, Invalid):
            if not skip_invalid:
                fields = ", ".join(FORMAT_FIELDS[report.format])
                raise invalid_record(path, raw.where, rec.problem, f"format {report.format}: {fields}")
            report.count("skipped_missing_fields", raw.line)
        elif rec == SKIP_EMPTY:
            report.count("skipped_empty_completion", raw.line)
        else:
            normalised.append((rec, f"{path}:{raw.where}"))
    samples = []
    for rec, source in normalised:
        if limit is not None and len(samples) == limit:
            break
        ids, labels = render_record(rec, tokenizer, special, train_on_prompt=train_on_prompt, source=source,
                                    max_tokens=max_len)
        if max_len is not None and len(ids) > max_len:
            if length_policy == "error":
                raise InputError(f"{source}: sample has more than max_len={max_len} tokens "
                                 "(length_policy='error'; use 'truncate' or 'drop')")
            if length_policy == "drop":
                report.count("dropped_too_long", rec.line)
                continue
            ids, labels = ids[:max_len], labels[:max_len]
            if any(label != IGNORE for label in labels):
                report.count("truncated", rec.line)
        if all(label == IGNORE for label in labels):
            report.count("skipped_no_trainable_tokens", rec.line)
            continue
        samples.append(Sample(ids, labels, source))
    report.kept = len(samples)
    if not samples:
        raise InputError(f"{path}: no usable samples; {report.summary()}")
    return samples, report


def split_eval(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``round(fraction * n)`` samples (at least 1), chosen by a seeded permutation.

    Both parts keep file order. Deterministic given (samples, fraction, seed).
    """
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"eval_split={fraction}; expected a fraction in [0, 1)")
    if fraction == 0.0:
        return samples, []
    n_eval = max(1, round(fraction * len(samples)))
    if n_eval >= len(samples):
        raise InputError(f"eval_split={fraction} leaves no training samples out of {len(samples)}")
    generator = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(len(samples), generator=generator)[:n_eval].tolist())
    train = [s for i, s in enumerate(samples) if i not in held]
    return train, [s for i, s in enumerate(samples) if i in held]


def load_with_eval(load_file: Callable[[str | Path], tuple[list, DataReport]], path: str | Path,
                   eval_path: str | Path | None, eval_split: float, seed: int
                   ) -> tuple[list, list, DataReport, DataReport | None]:
    """(train, held out, train report, eval report) from ``eval_path`` or an ``eval_split`` of ``path``.

    ``load_file`` reads one file (SFT samples or preference pairs). Both files are parsed and
    checked before either is tokenized, so a malformed eval file also fails before any work.
    """
    if eval_path is not None and eval_split:
        raise InputError("give either an eval file or eval_split, not both")
    if eval_path is not None:
        read_records(eval_path)  # fail early on a malformed eval file
    train, train_report = load_file(path)
    if eval_path is None:
        train, held = split_eval(train, eval_split, seed)
        return train, held, train_report, None
    held, eval_report = load_file(eval_path)
    return train, held, train_report, eval_report


def load_sft_data(path: str | Path, tokenizer: Any, *, format: str | None = None,
                  max_len: int | None = None, length_policy: str = "truncate",
                  train_on_prompt: bool = False, eval_path: str | Path | None = None,
                  eval_split: float = 0.0, seed: int = 0, skip_invalid: bool = False) -> SFTData:
    """Training (and evaluation) samples: from ``eval_path`` or an ``eval_split`` of ``path``."""
    def load_file(file: str | Path) -> tuple[list[Sample], DataReport]:
        return load_samples(file, tokenizer, format=format, max_len=max_len, length_policy=length_policy,
                            train_on_prompt=train_on_prompt, skip_invalid=skip_invalid)

    return SFTData(*load_with_eval(load_file, path, eval_path, eval_split, seed))
