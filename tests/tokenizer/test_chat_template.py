"""Chat template rendering against transformers' apply_chat_template(..., tokenize=False)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kestrel.tokenizer import ChatTemplateError, NoChatTemplateError, Tokenizer

transformers = pytest.importorskip("transformers")

SYSTEM_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! 你好 😀"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "  Write <b>code</b> & explain\n"},
]
USER_CHAT = [{"role": "user", "content": "What is 2+2?"}]

# Llama-3 style: bos, header tokens, trimmed contents, optional tools and a date line.
LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

STRICT_ALTERNATION = """{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '[' + message['role'] + '] ' + message['content'] + eos_token }}
{%- endfor %}
"""

# Jinja features templates rely on: namespace, loop controls, dict(), tojson options,
# generation blocks, whitespace control with trim_blocks/lstrip_blocks.
FEATURES = """{%- set ns = namespace(count=0, last='') %}
{%- for message in messages %}
    {%- if loop.index > 3 %}{% break %}{% endif %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- set ns.last = message['role'] %}
    {% generation %}{{ message['content'] }}{% endgeneration %}

    {{ dict(role=message['role'], n=ns.count) | tojson(sort_keys=True) }}
{%- endfor %}
{{ ns.count }} {{ ns.last }} {{ {'html': '<a&b>', 'uni': 'é😀'} | tojson }}
{{ messages | tojson(separators=(',', ':')) }}
{%- if extra_flag %} EXTRA {{ extra_flag }}{% endif %}
"""


def _render_both(ours: Tokenizer, hf, messages, **kwargs) -> tuple[str, str]:
    add_generation_prompt = kwargs.pop("add_generation_prompt", True)
    mine = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    theirs = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return mine, theirs


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [SYSTEM_CHAT, USER_CHAT], ids=["system", "no_system"])
def test_tiny_chatml_matches(tiny: Tokenizer, hf_tiny, messages, add_generation_prompt) -> None:
    mine, theirs = _render_both(
        tiny, hf_tiny, messages, add_generation_prompt=add_generation_prompt
    )
    assert mine == theirs
    assert mine.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_tiny_chatml_exact_text(tiny: Tokenizer) -> None:
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny.apply_chat_template(USER_CHAT) == expected  # add_generation_prompt defaults on


@pytest.fixture(scope="module")
def bos_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bos")
    shutil.copy(tiny_dir / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["bos_token"] = "<|endoftext|>"
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [SYSTEM_CHAT, USER_CHAT], ids=["system", "no_system"])
def test_llama3_style_matches(bos_dir: Path, messages, add_generation_prompt) -> None:
    ours = Tokenizer.from_dir(bos_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(bos_dir))
    kwargs = {"chat_template": LLAMA3_STYLE, "add_generation_prompt": add_generation_prompt}
    mine, theirs = _render_both(ours, hf, messages, **kwargs)
    assert mine == theirs
    assert mine.startswith("<|endoftext|><|start_header_id|>system")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    mine, theirs = _render_both(ours, hf, messages, tools=tools, date_string="1 Jan 2025", **kwargs)
    assert mine == theirs
    assert '"name": "get_weather"' in mine and "1 Jan 2025" in mine


def test_raise_exception_error_path(tiny: Tokenizer, hf_tiny) -> None:
    bad = [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "no"}]
    with pytest.raises(Exception) as theirs:
        hf_tiny.apply_chat_template(bad, chat_template=STRICT_ALTERNATION, tokenize=False)
    with pytest.raises(ChatTemplateError, match="roles must alternate") as mine:
        tiny.apply_chat_template(bad, chat_template=STRICT_ALTERNATION)
    assert str(theirs.value) in str(mine.value)
    # The same template renders a valid chat identically.
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    mine_text, theirs_text = _render_both(tiny, hf_tiny, good, chat_template=STRICT_ALTERNATION)
    assert mine_text == theirs_text == "[user] a<|im_end|>[assistant] b<|im_end|>"
    # The tiny ChatML template rejects unknown roles.
    with pytest.raises(ChatTemplateError, match="Unsupported role tool"):
        tiny.apply_chat_template([{"role": "tool", "content": "42"}])


def test_template_features_match(tiny: Tokenizer, hf_tiny) -> None:
    messages = [*SYSTEM_CHAT, {"role": "user", "content": "dropped by break", "name": None}]
    for extra in ({}, {"extra_flag": "yes"}):
        mine, theirs = _render_both(tiny, hf_tiny, messages, chat_template=FEATURES, **extra)
        assert mine == theirs
    assert "<a&b>" in mine and "é😀" in mine and "EXTRA yes" in mine
    assert "dropped by break" not in mine.split("\n")[-3]


def test_template_kwargs_override_special_tokens(tiny: Tokenizer, hf_tiny) -> None:
    template = "{{ eos_token }}|{{ pad_token }}|{{ bos_token }}|{{ messages[0]['content'] }}"
    mine, theirs = _render_both(tiny, hf_tiny, USER_CHAT, chat_template=template)
    assert mine == theirs == "<|im_end|>|<|endoftext|>||What is 2+2?"
    mine, theirs = _render_both(tiny, hf_tiny, USER_CHAT, chat_template=template, eos_token="E")
    assert mine == theirs == "E|<|endoftext|>||What is 2+2?"


def test_none_valued_keys_are_dropped(tiny: Tokenizer, hf_tiny) -> None:
    template = (
        "{% for m in messages %}{{ m['role'] }}:"
        "{% if m['content'] is defined %}{{ m['content'] }}{% else %}<none>{% endif %}"
        "{% if m['tool_calls'] is defined %}+tools{% endif %};{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
    ]
    mine, theirs = _render_both(tiny, hf_tiny, messages, chat_template=template)
    assert mine == theirs == "user:q;assistant:<none>+tools;"


def test_continue_final_message_matches(tiny: Tokenizer, hf_tiny) -> None:
    messages = [*USER_CHAT, {"role": "assistant", "content": "The answer is"}]
    mine = tiny.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    theirs = hf_tiny.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert mine == theirs
    assert mine.endswith("<|im_start|>assistant\nThe answer is")
    with pytest.raises(ValueError, match="exclusive"):
        tiny.apply_chat_template(messages, continue_final_message=True)


def test_render_chat_prompt_ids_matches(tiny: Tokenizer, hf_tiny) -> None:
    for messages in (SYSTEM_CHAT, USER_CHAT):
        ids = tiny.render_chat_prompt_ids(messages)
        expected = hf_tiny.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert ids == expected
        suffix = tiny.encode("<|im_start|>assistant\n", add_special_tokens=False)
        assert suffix[0] == 1 and ids[-len(suffix) :] == suffix


def test_no_chat_template_error(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(NoChatTemplateError, match="has no chat template: pass chat_template="):
        tok.apply_chat_template(USER_CHAT)
    # An explicit template still works.
    assert tok.apply_chat_template(USER_CHAT, chat_template="{{ messages[0].content }}") == (
        "What is 2+2?"
    )


def test_template_files_and_named_templates(tiny_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.mkdir()
    shutil.copy(tiny_dir / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = [
        {"name": "default", "template": "D:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T:{{ tools | length }}"},
        {"name": "rag", "template": "R:{{ documents[0].text }}"},
    ]
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = Tokenizer.from_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    tools = [{"type": "function", "function": {"name": "f"}}]
    docs = [{"title": "t", "text": "doc text"}]
    cases = [{}, {"tools": tools}, {"chat_template": "rag", "documents": docs}]
    expected = ["D:What is 2+2?", "T:1", "R:doc text"]
    for kwargs, want in zip(cases, expected):
        mine, theirs = _render_both(ours, hf, USER_CHAT, **kwargs)
        assert mine == theirs == want
    # chat_template.jinja takes precedence over the config's templates.
    (path / "chat_template.jinja").write_text("J:{{ messages | length }}", encoding="utf-8")
    ours = Tokenizer.from_dir(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    mine, theirs = _render_both(ours, hf, USER_CHAT)
    assert mine == theirs == "J:1"


def test_sandbox_and_syntax_errors(tiny: Tokenizer) -> None:
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        tiny.apply_chat_template(USER_CHAT, chat_template=escape)
    with pytest.raises(ChatTemplateError, match="underscore"):
        tiny.apply_chat_template(USER_CHAT, chat_template="{% set ns = namespace(_x=1) %}")
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        tiny.apply_chat_template(USER_CHAT, chat_template="ok\n{% for %}")


def test_strftime_now_matches(tiny: Tokenizer, hf_tiny) -> None:
    template = "{{ strftime_now('%Y') }}"
    mine, theirs = _render_both(tiny, hf_tiny, USER_CHAT, chat_template=template)
    assert mine == theirs and len(mine) == 4 and mine.isdigit()
