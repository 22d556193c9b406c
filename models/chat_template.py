"""Chat templates: render a conversation into the prompt text a chat model was trained on.

Templates are jinja2 strings shipped with a tokenizer (``tokenizer_config.json``'s ``chat_template``
or a ``chat_template.jinja`` file). They are untrusted code, so they run in jinja2's
``ImmutableSandboxedEnvironment``, set up the way ``transformers`` sets it up so that a template
renders byte for byte the same text:

* ``trim_blocks`` and ``lstrip_blocks`` on; the ``loopcontrols`` extension (``break``/``continue``);
  the ``{% generation %}...{% endgeneration %}`` tag (renders its body; it only marks assistant text);
* ``tojson`` as ``json.dumps`` (no HTML escaping, ``ensure_ascii=False``, optional ``indent``,
  ``separators``, ``sort_keys``), ``raise_exception(msg)``, ``strftime_now(fmt)``;
* variables ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None unless given),
  and the special tokens ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``.

Models that ship no template (Llama-2-chat's original release, for example) get `LLAMA2_TEMPLATE`,
Meta's Llama-2 chat format::

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user 1} [/INST] {assistant 1} </s><s>[INST] {user 2} [/INST]

An optional first ``system`` message is folded into the first user turn; user and assistant turns
must alternate, starting with the user; contents are stripped of surrounding whitespace; the text
ends after ``[/INST]`` when the last message is the user's (that is the generation prompt, so
``add_generation_prompt`` changes nothing).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from models.errors import InputError

LLAMA2_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 is even) %}"
    "{{ raise_exception('Llama-2 chat format: turns must alternate user/assistant, starting with user') }}"
    "{% endif %}"
    "{% set content = message['content'] | trim %}"
    "{% if loop.first and system is not none %}"
    "{% set content = '<<SYS>>\\n' ~ (system | trim) ~ '\\n<</SYS>>\\n\\n' ~ content %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token ~ '[INST] ' ~ content ~ ' [/INST]' }}"
    "{% else %}{{ ' ' ~ content ~ ' ' ~ eos_token }}{% endif %}"
    "{% endfor %}"
)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}body{% endgeneration %}`` renders ``body`` (HF uses the tag to find
    assistant tokens for loss masks; here it only has to parse and render the same text)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox (cached: templates are reused for every sample)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise InputError(f"chat template does not parse: {err} (line {err.lineno})") from None


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
        raise InputError("chat messages must be a list of dicts like {'role': 'user', 'content': 'Hi'}")
    for i, message in enumerate(messages):
        if "role" not in message:
            raise InputError(f"chat message {i} has no 'role': {message!r}")
    return [dict(m) for m in messages]  # templates cannot mutate the caller's messages


def render_chat(template: str, messages, *, add_generation_prompt: bool = False,
                special_tokens: dict[str, str | None] | None = None, tools=None, documents=None,
                **extra) -> str:
    """Render ``messages`` with the jinja ``template``. ``special_tokens`` maps ``bos_token`` etc.
    to their text; ``extra`` are further template variables (``enable_thinking=...``)."""
    variables = {**(special_tokens or {}), **extra}
    try:
        return compile_template(template).render(
            messages=_check_messages(messages), tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as err:  # raise_exception(...) or a sandbox violation
        raise InputError(f"chat template: {err}") from None
