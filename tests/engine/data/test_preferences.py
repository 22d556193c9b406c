"""Preference data: the three record forms, labels only on completions, the skip report, the length
policy, one concatenated batch per B pairs with a resumable order, and the license example files.

Uses the small real BPE tokenizer of tests/engine/data/doubles.py (ChatML template, BOS added) and
the SmolLM2 fixture tokenizer for the example files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from engine.data.preferences import (
    PairBatchLoader,
    PreferencePair,
    fit_length,
    load_dpo_data,
    load_preference_pairs,
)
from engine.data.render import IGNORE
from engine.errors import InputError
from tests.engine.data.doubles import TinyTokenizer

ROOT = Path(__file__).resolve().parents[3]
USER = {"role": "user", "content": "What is the capital of France?"}


def write(tmp_path: Path, records: list, name: str = "prefs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def decode(tok: TinyTokenizer, ids: list[int]) -> str:
    return tok.decode(ids)


def test_text_form_prompt_once_completions_end_in_eos(tmp_path):
    tok = TinyTokenizer()
    path = write(tmp_path, [{"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon."}])
    (pair,), report = load_preference_pairs(path, tok)
    assert pair.prompt == [tok.bos_token_id] + tok.encode("What is the capital of France?")
    assert pair.chosen == tok.encode(" Paris.") + [tok.eos_token_id]
    assert pair.rejected == tok.encode(" Lyon.") + [tok.eos_token_id]
    assert pair.source == f"{path}:1" and report.format == "text (1)" and report.kept == 1
    chosen, rejected = pair.rows()
    assert chosen.input_ids == pair.prompt + pair.chosen
    assert chosen.labels == [IGNORE] * len(pair.prompt) + pair.chosen
    assert rejected.labels == [IGNORE] * len(pair.prompt) + pair.rejected


@pytest.mark.parametrize("chosen, rejected", [
    ([{"role": "assistant", "content": "Paris."}], [{"role": "assistant", "content": "Lyon."}]),
    ({"role": "assistant", "content": "Paris."}, {"role": "assistant", "content": "Lyon."}),
    ("Paris.", "Lyon."),
])
def test_conversational_form_uses_the_chat_template(tmp_path, chosen, rejected):
    tok = TinyTokenizer()
    path = write(tmp_path, [{"prompt": [USER], "chosen": chosen, "rejected": rejected}])
    (pair,), report = load_preference_pairs(path, tok)
    assert decode(tok, pair.prompt) == ("<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                        "<|im_start|>assistant\n")
    # completions stop at the end-of-turn token: ChatML's trailing newline is not part of them
    assert decode(tok, pair.chosen) == "Paris.<|im_end|>" and decode(tok, pair.rejected) == "Lyon.<|im_end|>"
    assert report.format == "conversational (1)"


def test_implicit_prompt_forms(tmp_path):
    tok = TinyTokenizer()
    conv = {"chosen": [USER, {"role": "assistant", "content": "Paris."}],
            "rejected": [USER, {"role": "assistant", "content": "Lyon."}]}
    text = {"chosen": "Q: capital of France? A: Paris is.", "rejected": "Q: capital of France? A: Lyon is."}
    explicit = {"prompt": [USER], "chosen": "Paris.", "rejected": "Lyon."}
    (c, t, e), report = load_preference_pairs(write(tmp_path, [conv, text, explicit]), tok)
    assert (c.prompt, c.chosen, c.rejected) == (e.prompt, e.chosen, e.rejected)
    # strings: the common prefix cut back to a word boundary, the space goes with the completion
    assert t.prompt == [tok.bos_token_id] + tok.encode("Q: capital of France? A:")
    assert t.chosen == tok.encode(" Paris is.") + [tok.eos_token_id]
    assert report.format == "conversational (1), implicit-conversational (1), implicit-text (1)"


def test_invalid_pairs_are_errors_or_counted_skips_with_their_lines(tmp_path):
    tok = TinyTokenizer()
    good = {"prompt": "Question?", "chosen": " yes", "rejected": " no"}
    records = [good,
               {"prompt": "Question?", "rejected": " no"},                         # 2 missing chosen
               {"prompt": "Question?", "chosen": " yes"},                         # 3 missing rejected
               {"prompt": "Question?", "chosen": " same", "rejected": " same"},   # 4 identical
               {"prompt": "  ", "chosen": " yes", "rejected": " no"},             # 5 empty prompt
               {"prompt": [], "chosen": "yes", "rejected": "no"},                 # 6 empty prompt
               {"chosen": "no common prefix", "rejected": "different"},           # 7 empty prompt
               {"prompt": "Question?", "chosen": " ", "rejected": " no"},         # 8 empty completion
               {"prompt": "Question?", "chosen": 3, "rejected": " no"},           # 9 mistyped
               {"prompt": [USER], "chosen": [{"role": "assistant"}], "rejected": "no"},  # 10 malformed
               good]
    path = write(tmp_path, records)
    with pytest.raises(InputError, match=r":2: field 'chosen' is missing \(a preference pair needs"):
        load_preference_pairs(path, tok)
    for line, record, problem in ((9, records[8], "field 'chosen' must be a string like the prompt, got int"),
                                  (10, records[9], r"chosen\[0\]\.content is missing")):
        with pytest.raises(InputError, match=rf":1: {problem}"):
            load_preference_pairs(write(tmp_path, [record], name=f"one-{line}.jsonl"), tok)
    pairs, report = load_preference_pairs(path, tok, skip_invalid=True)
    assert len(pairs) == report.kept == 2 and report.loaded == 11
    assert report.lines == {"skipped_missing_fields": [2, 3, 9, 10], "skipped_identical": [4],
                            "skipped_empty_prompt": [5, 6, 7], "skipped_empty_completion": [8]}
    assert (report.skipped_missing_fields, report.skipped_identical, report.skipped_empty_prompt,
            report.skipped_empty_completion) == (4, 1, 3, 1)
    assert "4 skipped missing fields (lines 2, 3, 9, 10)" in report.summary()
    assert "1 skipped identical (lines 4)" in report.summary()


def test_optional_margin_is_read_per_pair_and_a_non_number_names_its_line(tmp_path):
    """TRL's reward-modelling field: a number (int or float) kept on the pair, 0 when absent; a
    string, a boolean, null or an infinity is an error naming file:line (or a counted skip)."""
    tok = TinyTokenizer()
    good = {"prompt": "Question?", "chosen": " yes", "rejected": " no"}
    records = [good, {**good, "margin": 2}, {**good, "margin": -0.5}, {**good, "margin": "1.0"},
               {**good, "margin": True}, {**good, "margin": None}, {**good, "margin": 1e999}]
    path = tmp_path / "margins.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}:4: field 'margin' must be a finite number, got '1.0'"):
        load_preference_pairs(path, tok)
    path.write_text("".join(json.dumps(r) + "\n" for r in records).replace("Infinity", "1e999"))
    pairs, report = load_preference_pairs(path, tok, skip_invalid=True)
    assert [p.margin for p in pairs] == [0.0, 2.0, -0.5] and all(isinstance(p.margin, float) for p in pairs)
    assert report.lines == {"skipped_missing_fields": [4, 5, 6, 7]}


def test_all_invalid_or_not_preference_data_is_an_error(tmp_path):
    tok = TinyTokenizer()
    bad = write(tmp_path, [{"prompt": "Q?", "chosen": " a", "rejected": " a"}, {"prompt": "", "chosen": "a",
                                                                                 "rejected": "b"}])
    with pytest.raises(InputError, match=r"no usable preference pairs.*1 skipped identical.*1 skipped empty prompt"):
        load_preference_pairs(bad, tok)
    sft = write(tmp_path, [{"messages": [USER]}], "sft.jsonl")
    with pytest.raises(InputError, match=r"not preference data; keys seen: messages"):
        load_preference_pairs(sft, tok)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "Q?", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(InputError, match=re.escape(f"{broken}:2")):
        load_dpo_data(tmp_path / "sft.jsonl", tok, eval_path=broken)


def test_fit_length_cuts_the_prompt_from_the_left_first():
    prompt, chosen, rejected = list(range(100)), list(range(1000, 1010)), list(range(2000, 2004))
    p, c, r = fit_length(prompt, chosen, rejected, 64)      # only the prompt is cut: 54 + 10 = 64
    assert p == prompt[46:] and c == chosen and r == rejected
    p, c, r = fit_length(prompt, list(range(1000, 1100)), rejected, 64)  # both: half the row each
    assert p == prompt[68:] and c == list(range(1000, 1032)) and r == rejected
    p, c, r = fit_length(prompt[:10], list(range(1000, 1100)), rejected, 64)  # short prompt kept whole
    assert p == prompt[:10] and len(c) == 54


def test_length_policies(tmp_path):
    tok = TinyTokenizer()
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    records = [{"prompt": "Q?", "chosen": " yes", "rejected": " no"},
               {"prompt": long_prompt, "chosen": " Paris.", "rejected": " Lyon."},
               {"prompt": long_prompt, "chosen": " the dog" * 20 + " A", "rejected": " the dog" * 20 + " B"}]
    path = write(tmp_path, records)
    pairs, report = load_preference_pairs(path, tok, max_len=24, length_policy="truncate")
    assert report.truncated == 1 and report.lines["truncated"] == [2]
    assert report.skipped_identical == 1 and report.lines["skipped_identical"] == [3]  # same once cut
    assert all(len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= 24 for p in pairs)
    assert pairs[1].chosen == tok.encode(" Paris.") + [tok.eos_token_id]  # the prompt paid for it
    pairs, report = load_preference_pairs(path, tok, max_len=24, length_policy="drop")
    assert len(pairs) == 1 and report.lines["dropped_too_long"] == [2, 3]
    with pytest.raises(InputError, match=re.escape(f"{path}:2: pair has") + r".*max_len=24"):
        load_preference_pairs(path, tok, max_len=24, length_policy="error")


def test_batches_put_chosen_then_rejected_rows_and_resume_exactly():
    pairs = [PreferencePair([1, 2 + i], [10 + i, 2], [20 + i] * (1 + i % 3) + [2], f"f:{i}") for i in range(7)]
    loader = PairBatchLoader(pairs, 3, pad_id=0, seed=5)
    batches = list(loader.batches(1))
    assert [b.input_ids.shape[0] for b in batches] == [6, 6, 2]
    order = [row[0] for b in batches for row in b.sample_ids[: len(b.sample_ids) // 2]]
    assert sorted(order) == list(range(7)) and order != list(range(7))
    first = batches[0]
    for row, (pair_id,) in enumerate(first.sample_ids):
        pair = pairs[pair_id]
        completion = pair.chosen if row < 3 else pair.rejected
        ids = pair.prompt + completion
        assert first.input_ids[row, :len(ids)].tolist() == ids
        assert first.labels[row, :len(ids)].tolist() == [IGNORE, IGNORE] + completion
        assert (first.labels[row, len(ids):] == IGNORE).all() and first.attention_mask[row].sum() == len(ids)
    assert first.sample_ids[:3] == first.sample_ids[3:]
    resumed = list(loader.batches(1, start=1))
    assert all(torch.equal(a.input_ids, b.input_ids) and a.index == b.index for a, b in zip(batches[1:], resumed))


def toy_pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair([1, 2 + i] + [3] * (i % 4), [10 + i, 2], [20 + i] * (1 + i % 3) + [2], f"f:{i}")
            for i in range(n)]


def test_padding_free_pair_batch_is_one_row_of_chosen_then_rejected_documents():
    pairs = toy_pairs(7)
    padded = list(PairBatchLoader(pairs, 3, pad_id=0, seed=5).batches(1))
    free = list(PairBatchLoader(pairs, 3, pad_id=0, seed=5, batching="padding-free").batches(1))
    assert len(free) == len(padded) == 3
    for p, f in zip(padded, free):
        chunk = [row[0] for row in p.sample_ids[: len(p.sample_ids) // 2]]
        assert f.sample_ids == [chunk + chunk] and f.num_documents == 2 * len(chunk)
        docs = [pairs[i].prompt + pairs[i].chosen for i in chunk] + [pairs[i].prompt + pairs[i].rejected for i in chunk]
        assert f.input_ids.shape == (1, sum(map(len, docs))) and bool(f.attention_mask.all())  # no padding at all
        assert f.input_ids[0].tolist() == [t for d in docs for t in d]
        assert f.position_ids[0].tolist() == [k for d in docs for k in range(len(d))]
        assert f.documents()[0].tolist() == [d for d, ids in enumerate(docs) for _ in ids]
        keep = p.labels != IGNORE  # the padded batch's labelled tokens, row by row, are the row's
        assert f.labels[f.labels != IGNORE].tolist() == p.labels[keep].tolist()


def test_packed_pair_rows_hold_max_len_tokens_in_document_order():
    pairs = toy_pairs(9)
    loader = PairBatchLoader(pairs, 4, pad_id=0, seed=2, batching="pack", max_len=13)
    batches = list(loader.batches(0))
    assert max(b.input_ids.shape[0] for b in batches) >= 2  # the 8 documents of 4 pairs need several rows
    for batch in batches:
        assert batch.input_ids.shape[1] == 13
        owners = [p for row in batch.sample_ids for p in row]
        half = len(owners) // 2
        assert owners[:half] == owners[half:]  # [c_1 … c_B, r_1 … r_B], row-major
        docs = batch.documents()
        for d, pair in enumerate(owners):
            ids = pairs[pair].prompt + (pairs[pair].chosen if d < half else pairs[pair].rejected)
            assert batch.input_ids[docs == d].tolist() == ids  # each document whole, in one row
    resumed = list(loader.batches(0, start=1))
    assert all(torch.equal(a.input_ids, b.input_ids) and a.sample_ids == b.sample_ids
               for a, b in zip(batches[1:], resumed))


def test_pair_token_budget_counts_both_sequences_and_resumes():
    pairs = toy_pairs(11)
    loader = PairBatchLoader(pairs, 2, pad_id=0, seed=1, batching="padding-free", max_tokens=40)
    batches = list(loader.batches(0))
    assert [p for b in batches for p in b.sample_ids[0][: b.num_documents // 2]] == loader.order(0)
    for b, after in zip(batches, batches[1:]):  # within the budget, and greedy: the next pair would not fit
        assert b.input_ids.shape[1] <= 40 < b.input_ids.shape[1] + loader.lengths[after.sample_ids[0][0]]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches[2:], loader.batches(0, start=2)))
    with pytest.raises(InputError, match=r"f:7: pair has 15 tokens.*--max-tokens-per-batch 14"):
        PairBatchLoader(pairs, 2, pad_id=0, batching="padding-free", max_tokens=14)


@pytest.mark.parametrize("batching", ["padded", "padding-free", "pack"])
def test_pair_batching_report_counts_what_the_batches_compute(batching):
    from engine.data.batching_report import dpo_batching_report

    pairs = toy_pairs(10)
    make = lambda b: PairBatchLoader(pairs, 3, pad_id=0, seed=4, batching=b, max_len=16)  # noqa: E731
    report = dpo_batching_report(make(batching))
    tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    assert (report.tokens, report.documents, report.batches) == (tokens, 20, 4)
    assert report.positions == sum(b.input_ids.numel() for b in make(batching).batches(0))
    assert report.padded_positions == sum(b.input_ids.numel() for b in make("padded").batches(0))
    assert (report.padding_fraction == 0) == (batching == "padding-free")


def test_license_prefs_load_with_the_smollm2_template(smollm2_dir):
    from models import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    data = load_dpo_data(ROOT / "examples" / "license_prefs.jsonl", tok, max_len=256,
                         eval_path=ROOT / "examples" / "license_prefs_eval.jsonl")
    assert 50 <= len(data.train) and 12 <= len(data.eval)
    for report in (data.train_report, data.eval_report):
        assert report.kept == report.loaded and report.truncated == 0, report.summary()
    end_of_turn = tok.encode("<|im_end|>")
    assert all(p.chosen[-1:] == end_of_turn and p.rejected[-1:] == end_of_turn for p in data.train + data.eval)


ANSWER = re.compile(r'(Section [0-9]+(?:\([a-d]\))?) says: "(.*)"', re.S)


def test_license_prefs_chosen_quotes_the_license_and_rejected_does_not():
    """Every chosen answer quotes the license verbatim (up to line breaks); the rejected answer is the
    same quotation altered, so it is not in the license; eval questions are not training questions."""
    license_text = " ".join((ROOT / "examples" / "APACHE-2.0.txt").read_text().split())
    prompts = {}
    for name in ("license_prefs.jsonl", "license_prefs_eval.jsonl"):
        rows = [json.loads(line) for line in (ROOT / "examples" / name).read_text().splitlines() if line.strip()]
        prompts[name] = {r["prompt"][-1]["content"] for r in rows}
        for r in rows:
            (where_c, chosen), (where_r, rejected) = (ANSWER.fullmatch(r[k][0]["content"]).groups()
                                                      for k in ("chosen", "rejected"))
            assert where_c == where_r and chosen in license_text and rejected not in license_text, r
    assert not prompts["license_prefs.jsonl"] & prompts["license_prefs_eval.jsonl"]
