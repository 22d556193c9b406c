"""Prompt-only data for GRPO: string and chat prompts, columns, truncation from the left (BOS kept),
errors naming file:line, the skip report, and a prompt loader whose epoch order is reproducible.

Uses the small BPE tokenizer of tests/engine/data/doubles.py (ChatML, adds BOS) and the SmolLM2
fixture tokenizer (its real chat template, no BOS added)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.data.prompts import PromptLoader, PromptSample, load_prompt_data, load_prompts
from engine.errors import InputError
from tests.engine.data.doubles import TinyTokenizer

USER = {"role": "user", "content": "What is 2 + 3?"}


def write(tmp_path: Path, records: list, name: str = "prompts.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from models import load_tokenizer

    return load_tokenizer(smollm2_dir)


def test_string_and_chat_prompts_with_the_smollm2_tokenizer(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    path = write(tmp_path, [{"prompt": "Question: 2 + 3 =", "answer": "5"},
                            {"prompt": [USER], "answer": "5", "level": 1}])
    (text, chat), report = load_prompts(path, tok, max_prompt_len=256)
    # raw text as-is (SmolLM2's tokenizer adds no BOS); the chat prompt opens the assistant's turn
    assert text.prompt_ids == tok.encode("Question: 2 + 3 =") and not text.conversational
    rendered = tok.apply_chat_template([USER], add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert chat.prompt_ids == tok.encode(rendered) and chat.conversational
    assert chat.prompt == [USER] and text.prompt == "Question: 2 + 3 ="
    assert text.columns == {"answer": "5"} and chat.columns == {"answer": "5", "level": 1}
    assert (text.source, chat.source) == (f"{path}:1", f"{path}:2")
    assert report.format == "conversational (1), text (1)" and report.kept == 2


def test_bos_is_added_when_the_tokenizer_adds_one_and_one_message_is_a_conversation(tmp_path):
    tok = TinyTokenizer()
    (text, chat), _ = load_prompts(write(tmp_path, [{"prompt": "What is the capital?"}, {"prompt": USER}]),
                                   tok, max_prompt_len=256)
    assert text.prompt_ids == [tok.bos_token_id] + tok.encode("What is the capital?")
    assert tok.decode(chat.prompt_ids) == ("<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                           "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert chat.prompt == [USER]  # one message object: a conversation of one


@pytest.mark.parametrize("add_bos", [True, False])
def test_truncation_keeps_the_end_and_bos(tmp_path, add_bos):
    tok = TinyTokenizer(add_bos=add_bos)
    long = "The quick brown fox jumps over the lazy dog. " * 40 + "What is the capital of France?"
    full = ([tok.bos_token_id] if add_bos else []) + tok.encode(long)
    path = write(tmp_path, [{"prompt": long}, {"prompt": "Hello!"}])
    (cut, short), report = load_prompts(path, tok, max_prompt_len=20)
    if add_bos:  # BOS, then the last 19 tokens
        assert cut.prompt_ids == [tok.bos_token_id] + full[-19:]
    else:
        assert cut.prompt_ids == full[-20:]
    assert tok.decode(cut.prompt_ids).endswith("What is the capital of France?")
    assert short.prompt_ids == ([tok.bos_token_id] if add_bos else []) + tok.encode("Hello!")
    assert report.truncated == 1 and report.lines["truncated"] == [1]
    # exactly max_prompt_len tokens is not too long
    exact = load_prompts(path, tok, max_prompt_len=len(full))[0][0]
    assert exact.prompt_ids == full


def test_length_policies_drop_and_error(tmp_path):
    tok = TinyTokenizer()
    path = write(tmp_path, [{"prompt": "Hello!"}, {"prompt": "The quick brown fox jumps over the lazy dog."}])
    kept, report = load_prompts(path, tok, max_prompt_len=5, length_policy="drop")
    assert [s.source for s in kept] == [f"{path}:1"] and report.dropped_too_long == 1
    assert report.lines["dropped_too_long"] == [2]
    with pytest.raises(InputError, match=rf"^{path}:2: prompt has more than max_prompt_len=5 tokens"):
        load_prompts(path, tok, max_prompt_len=5, length_policy="error")
    with pytest.raises(InputError, match="max_prompt_len=1; expected at least 2"):
        load_prompts(path, tok, max_prompt_len=1)


def test_invalid_prompts_are_errors_or_counted_skips_with_their_lines(tmp_path):
    tok = TinyTokenizer()
    records = [{"prompt": "Q?", "answer": 1},
               {"answer": 2},                                   # 2 missing prompt
               {"prompt": 3},                                   # 3 mistyped
               {"prompt": [{"role": "user"}]},                  # 4 message without content
               {"prompt": None},                                # 5 null
               {"prompt": "   "},                               # 6 empty
               {"prompt": []},                                  # 7 empty
               {"prompt": [{"role": "user", "content": " "}]},  # 8 empty
               {"prompt": "Q2?"}]
    path = write(tmp_path, records)
    with pytest.raises(InputError, match=rf"^{path}:2: field 'prompt' is missing \(a prompt is a string"):
        load_prompts(path, tok, max_prompt_len=64)
    for line, problem in ((3, "field 'prompt' must be a string or a list of messages, got int"),
                          (4, r"prompt\[0\]\.content is missing"),
                          (5, "field 'prompt' is null")):
        one = write(tmp_path, [records[line - 1]], name=f"one-{line}.jsonl")
        with pytest.raises(InputError, match=rf"^{one}:1: {problem}"):
            load_prompts(one, tok, max_prompt_len=64)
    samples, report = load_prompts(path, tok, max_prompt_len=64, skip_invalid=True)
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:9"] and report.loaded == 9
    assert report.lines == {"skipped_missing_fields": [2, 3, 4, 5], "skipped_empty_prompt": [6, 7, 8]}
    assert "3 skipped empty prompt (lines 6, 7, 8)" in report.summary()


def test_files_that_are_not_prompt_data(tmp_path):
    tok = TinyTokenizer()
    with pytest.raises(InputError, match=r"not prompt data; keys seen: question \(x2\), answer \(x1\)"):
        load_prompts(write(tmp_path, [{"question": "a", "answer": "b"}, {"question": "c"}]), tok, max_prompt_len=64)
    with pytest.raises(InputError, match="no usable prompts"):
        load_prompts(write(tmp_path, [{"prompt": ""}], name="empty.jsonl"), tok, max_prompt_len=64)
    with pytest.raises(InputError, match=r":2: malformed JSON"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
        load_prompts(bad, tok, max_prompt_len=64)
    with pytest.raises(InputError, match=rf"^{tmp_path / 'chat.jsonl'}:1: a conversational prompt .* needs a chat "
                       "template"):
        load_prompts(write(tmp_path, [{"prompt": [USER]}], name="chat.jsonl"), TinyTokenizer(chat_template=None),
                     max_prompt_len=64)


def test_columns_present_in_every_record_and_eval_split(tmp_path):
    tok = TinyTokenizer()
    records = [{"prompt": f"Q{i}?", "answer": str(i), **({"hint": "h"} if i % 3 else {})} for i in range(10)]
    data = load_prompt_data(write(tmp_path, records), tok, max_prompt_len=64, eval_split=0.2, seed=1)
    assert len(data.train) == 8 and len(data.eval) == 2 and data.eval_report is None
    assert data.columns() == {"answer"}
    missing = data.records_missing("hint")
    assert sorted(missing) == sorted(f"{tmp_path / 'prompts.jsonl'}:{i + 1}" for i in (0, 3, 6, 9))
    assert data.records_missing("answer") == []
    assert data.max_token_id() == max(max(s.prompt_ids) for s in data.train + data.eval)
    separate = load_prompt_data(write(tmp_path, records[:3]), tok, max_prompt_len=64,
                                eval_path=write(tmp_path, records[3:5], name="eval.jsonl"))
    assert len(separate.eval) == 2 and separate.eval_report.kept == 2


def samples(n: int) -> list[PromptSample]:
    return [PromptSample([1, 10 + i], f"p{i}", {}, f"f:{i + 1}") for i in range(n)]


def test_loader_order_is_reproducible_differs_per_epoch_and_covers_every_prompt():
    loader = PromptLoader(samples(11), batch_size=4, seed=3)
    assert loader.num_batches(0) == 3
    epochs = []
    for epoch in range(3):
        batches = list(loader.batches(epoch))
        assert [len(b) for b in batches] == [4, 4, 3]  # nothing dropped: the last batch is smaller
        assert [(b.epoch, b.index) for b in batches] == [(epoch, i) for i in range(3)]
        order = [i for b in batches for i in b.indices]
        assert sorted(order) == list(range(11))
        assert all(s is loader.samples[i] for b in batches for i, s in zip(b.indices, b.samples))
        assert batches[0].prompt_ids == [loader.samples[i].prompt_ids for i in batches[0].indices]
        epochs.append(order)
    assert len({tuple(o) for o in epochs}) == 3  # a new order each epoch
    again = PromptLoader(samples(11), batch_size=4, seed=3)
    assert [i for b in again.batches(1) for i in b.indices] == epochs[1]  # a pure function of (seed, epoch)
    assert again.batch(2, 1).indices == epochs[2][4:8]  # any batch alone, as Run.windows asks
    assert [i for b in again.batches(0, start=1) for i in b.indices] == epochs[0][4:]
    other = PromptLoader(samples(11), batch_size=4, seed=4)
    assert [i for b in other.batches(0) for i in b.indices] != epochs[0]
    plain = PromptLoader(samples(5), batch_size=2, shuffle=False)
    assert [b.indices for b in plain.batches(7)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="batch_size=0"):
        PromptLoader(samples(3), batch_size=0)
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptLoader([], batch_size=1)
