"""engine.data / data_formats / data_render: loading, format detection, rendering, masking,
length policy, skip counts and the eval split, against a small real BPE tokenizer
(tests/engine/data/doubles.py) and the SmolLM2 fixture tokenizer with its real chat template."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.data.batching import BatchLoader, collate_padded
from engine.data.formats import ALPACA_PROMPT
from engine.data.render import IGNORE
from engine.data.samples import load_samples, load_sft_data, split_eval
from engine.errors import InputError
from engine.losses.causal_lm import count_loss_tokens
from tests.engine.data.doubles import LLAMA2, UNSTABLE, TinyTokenizer

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def label_spans(labels: list[int]) -> list[list[int]]:
    """Maximal runs of trained labels, in order."""
    spans, run = [], []
    for label in labels + [IGNORE]:
        if label != IGNORE:
            run.append(label)
        elif run:
            spans.append(run)
            run = []
    return spans


def decoded_spans(tok, sample) -> list[str]:
    return [tok.decode(span) for span in label_spans(sample.labels)]


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, I think."}]
SHAREGPT = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
             "value": m["content"]} for m in CHAT]

FORMAT_ROWS = {
    "text": ({"text": "The quick brown fox."}, ["The quick brown fox.</s>"]),
    "completion": ({"prompt": "Question: 2+2? Answer:", "completion": " 4"}, [" 4</s>"]),
    "alpaca": ({"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
               ["4<|im_end|>"]),
    "messages": ({"messages": CHAT}, ["Paris.<|im_end|>", "Rome, I think.<|im_end|>"]),
    "sharegpt": ({"conversations": SHAREGPT}, ["Paris.<|im_end|>", "Rome, I think.<|im_end|>"]),
}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_format_detected_rendered_and_labels_cover_the_completion(tmp_path, fmt):
    row, expected = FORMAT_ROWS[fmt]
    tok = TinyTokenizer()
    samples, report = load_samples(write_jsonl(tmp_path / "d.jsonl", [row, row]), tok)
    assert report.format == fmt and report.loaded == report.kept == 2
    sample = samples[0]
    assert len(sample.input_ids) == len(sample.labels)
    assert sample.input_ids[0] == tok.bos_token_id and sample.labels[0] == IGNORE
    if fmt == "text":  # position 0 is never a label; everything after BOS is
        assert sample.labels[1:] == sample.input_ids[1:]
    assert decoded_spans(tok, sample) == expected
    # labels equal input ids wherever they are trained
    assert all(lab in (IGNORE, tid) for lab, tid in zip(sample.labels, sample.input_ids))
    assert samples[1].source.endswith("d.jsonl:2")


def test_format_can_be_forced_and_json_array_files_keep_line_numbers(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "text": "t"}, {"prompt": "p2", "completion": "c2"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    tok = TinyTokenizer()
    samples, report = load_samples(path, tok)
    assert report.format == "completion"  # "text" loses to a full match of another format
    assert [s.source.rsplit(":", 1)[1] for s in samples] == ["2 (array element 0)", "7 (array element 1)"]
    with pytest.raises(InputError, match=r"d\.json:7 \(array element 1\): field 'text' is missing \(format text"):
        load_samples(path, tok, format="text")
    forced, report = load_samples(path, tok, format="text", skip_invalid=True)
    assert report.format == "text" and report.kept == 1 and report.skipped_missing_fields == 1
    assert decoded_spans(tok, forced[0]) == ["t</s>"]


def test_jsonl_with_bom_crlf_and_line_separators_inside_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [json.dumps({"text": "one\u2028two"}, ensure_ascii=False), json.dumps({"text": "three"})]
    path.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    samples, report = load_samples(path, TinyTokenizer())
    assert report.kept == 2 and samples[1].source.endswith(":2")


def test_messages_and_sharegpt_render_identically(tmp_path):
    tok = TinyTokenizer()
    a, _ = load_samples(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), tok)
    b, _ = load_samples(write_jsonl(tmp_path / "s.jsonl", [{"conversations": SHAREGPT}]), tok)
    assert a[0].input_ids == b[0].input_ids and a[0].labels == b[0].labels
    assert tok.decode(a[0].input_ids[1:]) == tok.apply_chat_template(CHAT)


def test_template_that_writes_bos_gets_no_second_bos(tmp_path):
    tok = TinyTokenizer(chat_template=LLAMA2)
    samples, _ = load_samples(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT[1:]}]), tok)
    ids = samples[0].input_ids
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert decoded_spans(tok, samples[0]) == [" Paris.</s>", " Rome, I think.</s>"]


def test_final_turn_without_stop_token_gets_eos_and_extra_stop_ids_end_turns(tmp_path):
    rows = [{"messages": CHAT[1:3]}]
    tok = TinyTokenizer(extra_stop=None)  # <|im_end|> is not a stop id: EOS appended after it
    samples, _ = load_samples(write_jsonl(tmp_path / "m.jsonl", rows), tok)
    assert decoded_spans(tok, samples[0]) == ["Paris.<|im_end|>\n</s>"]
    tok = TinyTokenizer(chat_template="{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    samples, _ = load_samples(write_jsonl(tmp_path / "m.jsonl", rows), tok)
    assert samples[0].input_ids[-1] == tok.eos_token_id
    assert decoded_spans(tok, samples[0]) == ["Paris.|</s>"]


def test_train_on_prompt_labels_everything_but_position_zero(tmp_path):
    tok = TinyTokenizer()
    for row, _ in FORMAT_ROWS.values():
        samples, _ = load_samples(write_jsonl(tmp_path / "d.jsonl", [row]), tok,
                                  train_on_prompt=True)
        assert samples[0].labels == [IGNORE] + samples[0].input_ids[1:]


def test_eos_is_kept_as_a_label_when_pad_equals_eos(tmp_path):
    tok = TinyTokenizer(pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    rows = [{"prompt": "Q:", "completion": " yes"}, {"prompt": "Q: longer question", "completion": " no"}]
    samples, _ = load_samples(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    for s in samples:
        assert s.input_ids[-1] == tok.eos_token_id and s.labels[-1] == tok.eos_token_id
    batch = collate_padded(samples, tok.pad_token_id)
    short = len(samples[0].input_ids)
    assert batch["labels"][0, short - 1] == tok.eos_token_id
    assert (batch["labels"][0, short:] == IGNORE).all() and (batch["input_ids"][0, short:] == tok.eos_token_id).all()


def test_alpaca_without_chat_template_uses_the_alpaca_prompt(tmp_path):
    tok = TinyTokenizer(chat_template=None)
    row = {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}
    samples, _ = load_samples(write_jsonl(tmp_path / "a.jsonl", [row]), tok)
    prompt = ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"])
    assert tok.decode(samples[0].input_ids) == "<s>" + prompt + "4</s>"
    assert decoded_spans(tok, samples[0]) == ["4</s>"]
    with pytest.raises(InputError, match="chat template"):
        load_samples(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), tok)


def test_template_that_is_not_prefix_stable_is_refused(tmp_path):
    tok = TinyTokenizer(chat_template=UNSTABLE)
    with pytest.raises(InputError, match=r"m\.jsonl:1: .*prefix-stable"):
        load_samples(write_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT}]), tok)


def long_rows() -> list[dict]:
    return [{"prompt": "Q:", "completion": " short"},
            {"prompt": "Q:", "completion": " the quick brown fox jumps over the lazy dog " * 3},
            {"prompt": "The quick brown fox jumps over the lazy dog. " * 3, "completion": " x"},
            {"prompt": "Q:", "completion": " fine"}]


def test_length_policies_truncate_drop_error(tmp_path):
    tok = TinyTokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", long_rows())
    max_len = 12
    samples, report = load_samples(path, tok, max_len=max_len, length_policy="truncate")
    assert (report.loaded, report.kept, report.truncated) == (4, 3, 1)
    assert report.skipped_no_trainable_tokens == 1 and report.lines["skipped_no_trainable_tokens"] == [3]
    assert report.lines["truncated"] == [2] and max(len(s.input_ids) for s in samples) == max_len
    truncated = samples[1]
    full, _ = load_samples(path, tok)
    assert truncated.input_ids == full[1].input_ids[:max_len] and truncated.labels == full[1].labels[:max_len]
    samples, report = load_samples(path, tok, max_len=max_len, length_policy="drop")
    assert (report.kept, report.dropped_too_long, report.lines["dropped_too_long"]) == (2, 2, [2, 3])
    assert [s.source[-1] for s in samples] == ["1", "4"]
    with pytest.raises(InputError, match=r"d\.jsonl:2: sample has more than max_len=12 tokens"):
        load_samples(path, tok, max_len=max_len, length_policy="error")


def test_invalid_records_are_errors_naming_line_and_field_or_counted_skips(tmp_path):
    rows = [{"prompt": "Q:", "completion": " ok"}, {"prompt": "Q:"}, {"prompt": "Q:", "completion": "  "},
            {"prompt": 3, "completion": "x"}, {"prompt": "Q:", "completion": " fine"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError, match=r"d\.jsonl:2: field 'completion' is missing \(format completion: "
                                         r"prompt, completion\); .*--skip-invalid-records"):
        load_samples(path, TinyTokenizer())
    with pytest.raises(InputError, match=r"e\.jsonl:2: field 'prompt' must be a string, got int"):
        load_samples(write_jsonl(tmp_path / "e.jsonl", rows[2:]), TinyTokenizer())
    samples, report = load_samples(path, TinyTokenizer(), skip_invalid=True)
    assert (report.loaded, report.kept) == (5, 2)
    assert report.skipped_missing_fields == 2 and report.lines["skipped_missing_fields"] == [2, 4]
    assert report.skipped_empty_completion == 1 and report.lines["skipped_empty_completion"] == [3]
    assert "2 skipped missing fields (lines 2, 4)" in report.summary()
    chats = [{"messages": [{"role": "user", "content": "hi"}]},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
             {"messages": [{"role": "robot", "content": "hi"}]}, {"messages": CHAT}]
    with pytest.raises(InputError, match=r"c\.jsonl:3: messages\[0\]\.role is 'robot', expected one of system"):
        load_samples(write_jsonl(tmp_path / "c.jsonl", chats), TinyTokenizer())
    _, report = load_samples(write_jsonl(tmp_path / "c.jsonl", chats), TinyTokenizer(), skip_invalid=True)
    assert (report.kept, report.skipped_empty_completion, report.skipped_missing_fields) == (1, 2, 1)


def test_every_sample_invalid_is_an_error(tmp_path):
    rows = [{"prompt": "Q:", "completion": ""}, {"prompt": "Q:", "completion": None}]
    with pytest.raises(InputError, match=r"d\.jsonl:2: field 'completion' is null, expected a string"):
        load_samples(write_jsonl(tmp_path / "d.jsonl", rows), TinyTokenizer())
    with pytest.raises(InputError, match=r"d\.jsonl: no usable samples.*1 skipped empty completion"):
        load_samples(write_jsonl(tmp_path / "d.jsonl", rows), TinyTokenizer(), skip_invalid=True)


@pytest.mark.parametrize("suffix,content,where", [
    (".jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n', ":4: malformed JSON"),
    (".jsonl", '{"text": "a"}\n["text"]\n', ":2: expected a JSON object, got list"),
    (".json", '[\n {"text": "a"},\n {"text": "b"}\n {"text": "c"}\n]', ":4: malformed JSON array"),
    (".json", '[\n {"text": "a"},\n {"text": }\n]', ":3: malformed JSON"),
])
def test_malformed_input_fails_naming_file_and_line_before_any_tokenization(tmp_path, suffix, content, where):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content, encoding="utf-8")
    tok = TinyTokenizer()
    with pytest.raises(InputError) as err:
        load_sft_data(path, tok)
    assert f"bad{suffix}{where}" in str(err.value)
    assert tok.calls == 0  # nothing was tokenized or rendered
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    with pytest.raises(InputError, match=f"bad{suffix}"):
        load_sft_data(good, tok, eval_path=path)
    assert tok.calls == 0  # a bad eval file also fails before the training file is tokenized


def test_unknown_and_ambiguous_formats_list_keys_and_formats(tmp_path):
    tok = TinyTokenizer()
    unknown = r"unknown data format; keys seen: question \(x1\), answer.*accepted formats: text \(text\)"
    with pytest.raises(InputError, match=unknown):
        load_samples(write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}]), tok)
    mixed = [{"text": "a"}, {"prompt": "p", "completion": "c"}]
    mixed_msg = r"ambiguous data format.*text \(first at line 1\), completion \(first at line 2\)"
    with pytest.raises(InputError, match=mixed_msg):
        load_samples(write_jsonl(tmp_path / "m.jsonl", mixed), tok)
    with pytest.raises(InputError, match=r"b\.jsonl:1: ambiguous record.*messages and sharegpt"):
        load_samples(write_jsonl(tmp_path / "b.jsonl", [{"messages": CHAT, "conversations": SHAREGPT}]), tok)
    with pytest.raises(InputError, match="format='chatml' is not a known data format"):
        load_samples(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}]), tok, format="chatml")


def test_eval_split_is_deterministic_disjoint_and_covers_everything(tmp_path):
    rows = [{"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = TinyTokenizer()
    a = load_sft_data(path, tok, eval_split=0.25, seed=3)
    b = load_sft_data(path, tok, eval_split=0.25, seed=3)
    c = load_sft_data(path, tok, eval_split=0.25, seed=4)
    sources = lambda xs: [s.source for s in xs]  # noqa: E731
    assert len(a.eval) == 5 and len(a.train) == 15 and a.eval_report is None
    assert sources(a.eval) == sources(b.eval) and sources(a.eval) != sources(c.eval)
    assert sorted(sources(a.train) + sources(a.eval)) == sorted(f"{path}:{i}" for i in range(1, 21))
    with pytest.raises(InputError, match="eval_split"):
        split_eval(a.train, 1.0, 0)
    sep = load_sft_data(path, tok, eval_path=write_jsonl(tmp_path / "e.jsonl", rows[:3]))
    assert len(sep.train) == 20 and len(sep.eval) == 3 and sep.eval_report.kept == 3


# ------------------------------------------------------------------ the example dataset


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def normalise_space(text: str) -> str:
    return " ".join(text.split())


def quoted_passages(answer: str) -> list[str]:
    """Text between an opening '"' (after a space, '(' or the start) and a closing '"' (before a
    space, punctuation or the end); quotes nested inside a passage stay part of it."""
    return re.findall(r'(?:(?<=^)|(?<=[\s(]))"(.+?)"(?=[\s.,;:)]|$)', answer)


def test_license_qa_answers_quote_the_license_verbatim_and_name_the_section():
    license_text = normalise_space((EXAMPLES / "APACHE-2.0.txt").read_text(encoding="utf-8"))
    train, held = read_rows(EXAMPLES / "license_qa.jsonl"), read_rows(EXAMPLES / "license_qa_eval.jsonl")
    assert len(train) >= 100 and len(held) >= 25
    for row in train + held:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        passages = quoted_passages(assistant["content"])
        assert passages, assistant["content"]
        for passage in passages:
            assert normalise_space(passage) in license_text, passage
        assert re.search(r"Section \d|Appendix|boilerplate|Version 2\.0", assistant["content"])
    questions = {r["messages"][0]["content"] for r in train}
    assert len(questions) == len(train)
    assert not questions & {r["messages"][0]["content"] for r in held}
    assert {r["messages"][1]["content"] for r in held} <= {r["messages"][1]["content"] for r in train}


@pytest.mark.parametrize("name", ["license_qa.jsonl", "license_qa_eval.jsonl"])
def test_license_qa_with_the_smollm2_tokenizer_and_its_real_template(smollm2_dir, name):
    from models.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    path = EXAMPLES / name
    samples, report = load_samples(path, tok, max_len=256, length_policy="error")
    assert report.format == "messages" and report.kept == report.loaded == len(samples)
    end_of_turn = tok.decode([tok.eos_token_id])
    for sample, row in zip(samples, read_rows(path)):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert decoded_spans(tok, sample) == [a + end_of_turn for a in answers], sample.source
        # ChatML's newline after <|im_end|> is not trained on; the end-of-turn token (= EOS = pad) is
        assert sample.labels[-2] == tok.eos_token_id == tok.pad_token_id and sample.labels[-1] == IGNORE
    trained = load_samples(path, tok, max_len=256, train_on_prompt=True)[0]
    assert all(s.labels[1:] == s.input_ids[1:] for s in trained)
    packed = list(BatchLoader(samples, 4, pad_id=tok.pad_token_id, pack=True, max_len=256).batches(0))
    assert sum(count_loss_tokens(b) for b in packed) == sum(s.loss_tokens for s in samples)
    assert sum(b.input_ids.shape[0] for b in packed) <= len(samples) // 2  # >= 2 samples per row


# ---------------------------------------------------------------------------- bounded tokenization

class CountingTokenizer:
    """A real tokenizer that records the longest text it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.longest = inner, 0

    def encode(self, text, add_special_tokens=False):
        self.longest = max(self.longest, len(text))
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_huge_record_is_tokenized_only_as_far_as_max_len_needs(tmp_path):
    words = "the quick brown fox jumps over the lazy dog " * 20_000  # ~900k characters
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": words}])
    tok = CountingTokenizer(TinyTokenizer())
    samples, report = load_samples(path, tok, max_len=64)
    assert tok.longest < 20_000 and report.truncated == 1 and len(samples[0].input_ids) == 64
    whole, _ = load_samples(path, TinyTokenizer())  # unbounded: the same first 64 tokens
    assert samples[0].input_ids == whole[0].input_ids[:64] and samples[0].labels == whole[0].labels[:64]


def test_encode_tail_keeps_the_last_tokens_of_a_long_text():
    from engine.data.render import encode_tail

    tok = TinyTokenizer()
    text = "the quick brown fox jumps over the lazy dog " * 5_000
    ids, cut = encode_tail(tok, text, 40)
    assert cut and ids == tok.encode(text, add_special_tokens=False)[-40:]
    short, cut = encode_tail(tok, "a short prompt", 40)
    assert not cut and short == tok.encode("a short prompt", add_special_tokens=False)


def test_limit_tokenizes_only_the_first_usable_samples(tmp_path):
    """``limit`` returns the first usable samples of the full load (an empty completion skipped
    before them does not count), and a bad record after them is still refused."""
    rows = [{"prompt": "a", "completion": ""}] + [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full, _ = load_samples(path, TinyTokenizer())
    first, _ = load_samples(path, TinyTokenizer(), limit=2)
    assert [(s.input_ids, s.labels, s.source) for s in first] == [(s.input_ids, s.labels, s.source) for s in full[:2]]
    write_jsonl(path, rows + [{"nothing": 1}])
    with pytest.raises(InputError, match=":7"):
        load_samples(path, TinyTokenizer(), limit=2)
