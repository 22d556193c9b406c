"""models.tokenizer / models.chat_template against transformers' AutoTokenizer on the same folder."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from engine.errors import InputError
from models.chat_template import LLAMA2_TEMPLATE
from models.tokenizer import load_tokenizer

CORPUS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "  leading spaces and trailing   ",
    "whitespace runs:\t\t tabs,\n\nnewlines\r\n and    spaces",
    "digits 1234567 and 3.14159, -42, 1e-5, 2024-01-01",
    "unicode: naïve café, Ελληνικά, русский, עברית, العربية",
    "CJK: 你好，世界！日本語のテキスト。한국어 문장",
    "emoji: 🤗🚀 👩‍👩‍👧 ❤️ 🇫🇷",
    "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(10)]  # comment\n    pass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text between<|endoftext|> specials <reponame>x<file_sep>",
    "",
    " ",
    "a",
    "don't won't they're I'm we've",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6"}],
    [{"role": "user", "content": "  spaced  \n"}, {"role": "assistant", "content": "ok 🤗"},
     {"role": "user", "content": "tabs\tand\nnewlines"}],
]

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Exercises the environment: tojson options, namespace, loop controls, tests, raise_exception.
FEATURE_TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- if m.role == 'skip' %}{% continue %}{% endif -%}\n"
    "  {%- set ns.n = ns.n + 1 -%}\n"
    "  {{ ns.n }}:{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=true) }}\n"
    "  {% if m.role not in ['user', 'assistant', 'system', 'skip'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\n"
    "{% endfor %}\n"
    "{% if tools is none %}no tools{% endif %} {{ eos_token }}{{ pad_token }}{{ unk_token }}"
    "{% if add_generation_prompt %}GO{% endif %}"
)


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def _copy_tokenizer(src, dst, **config_updates):
    """A folder with the fixture's tokenizer.json and a modified tokenizer_config.json."""
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    for key, value in config_updates.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_ids_equal_transformers(ours, hf, add_special_tokens):
    for text in CORPUS:
        expected = hf(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, repr(text)


def test_digits_are_split_and_specials_matched(ours):
    assert [ours.decode([i]) for i in ours.encode("1234567")] == list("1234567")
    assert ours.encode("<|im_start|>") == [1]


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_round_trip(ours, hf, skip_special_tokens):
    for text in CORPUS:
        ids = ours.encode(text)
        decoded = ours.decode(ids, skip_special_tokens=skip_special_tokens)
        assert decoded == hf.decode(ids, skip_special_tokens=skip_special_tokens), repr(text)
        if not skip_special_tokens:
            assert decoded == text


def test_special_ids(ours, hf):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id)
    assert ours.eos_token_ids == [2]
    assert ours.vocab_size == len(hf) == 49152


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_equals_transformers(ours, hf, add_generation_prompt):
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, FEATURE_TEMPLATE], ids=["llama3", "features"])
def test_other_templates_equal_transformers(smollm2_dir, tmp_path, template):
    folder = _copy_tokenizer(smollm2_dir, tmp_path / "tok", chat_template=template,
                             bos_token="<|endoftext|>", pad_token=None)
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    messages = CONVERSATIONS[2] + [{"role": "skip", "content": "x"}, {"role": "user", "content": "é \"q\" <b>"}]
    for add in (False, True):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected


def test_template_sources_and_exceptions(smollm2_dir, tmp_path):
    listed = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0].content }}!"}]
    folder = _copy_tokenizer(smollm2_dir, tmp_path / "list", chat_template=listed)
    assert load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    (folder / "chat_template.jinja").write_text("{{ messages | length }} messages")
    assert load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "hi"}]) == "1 messages"
    raising = _copy_tokenizer(smollm2_dir, tmp_path / "raise", chat_template=FEATURE_TEMPLATE)
    with pytest.raises(InputError, match="bad role robot"):
        load_tokenizer(raising).apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(InputError, match="list of dicts"):
        load_tokenizer(raising).apply_chat_template("hello")


def test_llama2_fallback_format(smollm2_dir, tmp_path):
    folder = _copy_tokenizer(smollm2_dir, tmp_path / "l2", chat_template=None, bos_token="<s>", eos_token="</s>")
    tok = load_tokenizer(folder)
    assert tok.chat_template is None
    chat = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    expected = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]"
    assert tok.apply_chat_template(chat) == expected
    assert tok.apply_chat_template(chat[1:2], add_generation_prompt=True) == "<s>[INST] Hi [/INST]"
    # transformers renders our fallback template to the same text
    hf = AutoTokenizer.from_pretrained(str(folder))
    assert hf.apply_chat_template(chat, tokenize=False, chat_template=LLAMA2_TEMPLATE) == expected
    with pytest.raises(InputError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "first"}])


def _template_processor(bos: bool, eos: bool) -> dict:
    single = ([{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}] if bos else []) + [
        {"Sequence": {"id": "A", "type_id": 0}}] + ([{"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}] if eos else [])
    special = {t: {"id": t, "ids": [i], "tokens": [t]} for t, i, on in (("<|im_start|>", 1, bos), ("<|im_end|>", 2, eos)) if on}
    return {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": special}


@pytest.mark.parametrize("bos,eos", [(True, False), (True, True), (False, True)])
def test_post_processor_decides_bos_eos_as_in_transformers(smollm2_dir, tmp_path, bos, eos):
    """transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists; so do we."""
    folder = _copy_tokenizer(smollm2_dir, tmp_path / "flags", add_bos_token=not bos, add_eos_token=not eos)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = _template_processor(bos, eos)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    for text in CORPUS[:4]:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == hf(text)["input_ids"]
        assert ids == [1] * bos + ours.encode(text) + [2] * eos
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]


def test_generation_config_stop_ids(smollm2_dir, tmp_path):
    folder = _copy_tokenizer(smollm2_dir, tmp_path / "gen", pad_token=None)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2, 5]}))
    tok = load_tokenizer(folder)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == [2, 0, 5] and tok.pad_token_id == 2


def test_bad_inputs(tmp_path, ours):
    with pytest.raises(InputError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(InputError, match="str"):
        ours.encode(123)
    with pytest.raises(InputError, match="role"):
        ours.apply_chat_template([{"content": "no role"}])
