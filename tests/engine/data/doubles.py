"""A small real tokenizer for the data tests: byte-level BPE (trained here, in milliseconds) with
special tokens, wrapped to the interface of `models.tokenizer` (encode / decode /
apply_chat_template / bos_token_id / eos_token_id / eos_token_ids / pad_token_id / chat_template).
"""

from __future__ import annotations

import functools

import jinja2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

# ChatML with a default system prompt when the conversation has none (as SmolLM2's template).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-2 style: the template writes BOS itself and ends assistant turns with EOS.
LLAMA2 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token }}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% else %}<<SYS>>{{ message['content'] }}<</SYS>>{% endif %}"
    "{% endfor %}"
)
# Not prefix-stable: the rendering of earlier turns depends on how many turns follow.
UNSTABLE = (
    "{% for message in messages %}{{ message['role'] }}({{ messages|length }}): "
    "{{ message['content'] }}<|im_end|>{% endfor %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. ### Instruction: ### Input: ### Response:",
    "system user assistant You are a helpful assistant. Hello! How are you? I am fine, thanks.",
    "[INST] <<SYS>> 0123456789 license grant patent copyright notice contribution work",
]


@functools.lru_cache(maxsize=None)
def _trained_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    return tok.to_str()


class TinyTokenizer:
    """Duck-typed like `models.tokenizer.Tokenizer`; `calls` counts encode/template calls."""

    def __init__(self, chat_template: str | None = CHATML, add_bos: bool = True,
                 pad_is_eos: bool = False, extra_stop: str | None = "<|im_end|>"):
        self._tok = Tokenizer.from_str(_trained_json())
        self.bos_token_id = self._tok.token_to_id("<s>")
        self.eos_token_id = self._tok.token_to_id("</s>")
        self.eos_token_ids = [self.eos_token_id] + ([self._tok.token_to_id(extra_stop)] if extra_stop else [])
        self.pad_token_id = self.eos_token_id if pad_is_eos else self._tok.token_to_id("<pad>")
        if add_bos:
            self._tok.post_processor = processors.TemplateProcessing(
                single="<s> $A", special_tokens=[("<s>", self.bos_token_id)])
        self.chat_template = chat_template
        self.vocab_size = self._tok.get_vocab_size()
        self.calls = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.calls += 1
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        self.calls += 1
        template = jinja2.Environment().from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token="<s>", eos_token="</s>")
