"""Tool-call and reasoning parsers on outputs shaped like each model family's, whole and
streamed: the concatenated stream deltas equal the one-shot parse for every split."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kestrel_server.chat_output import OutputParsing
from kestrel_server.reasoning_parsers import REASONING_PARSERS
from kestrel_server.tool_parsers import (
    TOOL_PARSERS,
    NamedFunctionParser,
    RequiredToolParser,
    ToolParser,
)
from kestrel_server.tool_parsers.json_scan import NotJSON, scan_object, value_end

QWEN25_TWO_CALLS = (
    "<tool_call>\n"
    '{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", '
    '"unit": "celsius"}}\n'
    "</tool_call>\n"
    "<tool_call>\n"
    '{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", '
    '"date": "2024-10-01", "unit": "celsius"}}\n'
    "</tool_call>"
)
QWEN_CONTENT_THEN_CALL = (
    "Let me look that up.\n\n"
    '<tool_call>\n{"name": "search", "arguments": {"query": "a \\"quoted\\" }{ brace", '
    '"filters": [1, 2.5, true, null, {"k": []}]}}\n</tool_call>'
)
LLAMA3_ONE = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
LLAMA3_TAGGED_TWO = (
    '<|python_tag|>{"name": "a", "parameters": {}}; '
    '{"name": "b", "parameters": {"x": [1, 2, {"y": "}"}]}}'
)
MISTRAL_V3 = (
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {"tz": "CET"}}]</s>'
)
MISTRAL_V11 = (
    'I\'ll check both.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
    '[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}'
)

CASES = [
    (
        "hermes",
        QWEN25_TWO_CALLS,
        None,
        [
            (
                "get_current_temperature",
                {"location": "San Francisco, CA, USA", "unit": "celsius"},
            ),
            (
                "get_temperature_date",
                {"location": "San Francisco, CA, USA", "date": "2024-10-01", "unit": "celsius"},
            ),
        ],
    ),
    (
        "hermes",
        QWEN_CONTENT_THEN_CALL,
        "Let me look that up.",
        [("search", {"query": 'a "quoted" }{ brace', "filters": [1, 2.5, True, None, {"k": []}]})],
    ),
    ("hermes", "Plain answer, no tools <tool_ here.", "Plain answer, no tools <tool_ here.", []),
    ("llama3_json", LLAMA3_ONE, None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ("llama3_json", LLAMA3_TAGGED_TWO, None, [("a", {}), ("b", {"x": [1, 2, {"y": "}"}]})]),
    ("llama3_json", "The answer is 4.", "The answer is 4.", []),
    (
        "mistral",
        MISTRAL_V3,
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})],
    ),
    (
        "mistral",
        MISTRAL_V11,
        "I'll check both.",
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})],
    ),
    ("mistral", "No calls [TOOL here", "No calls [TOOL here", []),
]


def _calls(extracted) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in extracted.tool_calls]


def stream(parser: ToolParser, chunks: list[str]) -> tuple[str | None, list[dict]]:
    """Feeds `chunks` as a stream; returns (content, calls as {id, name, arguments}), checking
    the OpenAI delta shape: id, type and name once, first; then argument fragments only."""
    content = []
    calls: list[dict] = []
    for i, chunk in enumerate(chunks):
        delta = parser.extract_streaming(chunk, final=i == len(chunks) - 1)
        if delta.content:
            content.append(delta.content)
        for part in delta.tool_calls:
            if part.index == len(calls):
                assert part.id and part.type == "function" and part.function.name
                calls.append({"id": part.id, "name": part.function.name, "arguments": ""})
            else:
                assert part.index < len(calls)
                assert part.id is None and part.function.name is None
            calls[part.index]["arguments"] += part.function.arguments or ""
    return ("".join(content) or None), calls


def _assert_stream_matches(new_parser, text: str, chunks: list[str]) -> None:
    whole = new_parser().extract(text)
    content, calls = stream(new_parser(), chunks)
    assert content == whole.content, chunks
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls
    ], chunks


@pytest.mark.parametrize(("family", "text", "content", "calls"), CASES)
def test_extract(family, text, content, calls):
    extracted = TOOL_PARSERS[family]().extract(text)
    assert extracted.content == content
    assert _calls(extracted) == calls
    assert len({c.id for c in extracted.tool_calls}) == len(calls)


@pytest.mark.parametrize(("family", "text", "content", "calls"), CASES)
def test_stream_split_at_every_boundary(family, text, content, calls):
    new_parser = TOOL_PARSERS[family]
    for k in range(len(text) + 1):
        _assert_stream_matches(new_parser, text, [text[:k], text[k:]])
    _assert_stream_matches(new_parser, text, [*text, ""])  # one character per delta
    _assert_stream_matches(new_parser, text, list(text))  # the last character is final


def test_mistral_ids_are_nine_alphanumerics():
    extracted = TOOL_PARSERS["mistral"]().extract(MISTRAL_V11)
    assert all(len(c.id) == 9 and c.id.isalnum() for c in extracted.tool_calls)
    hermes = TOOL_PARSERS["hermes"]().extract(QWEN25_TWO_CALLS)
    assert all(c.id.startswith("call_") for c in hermes.tool_calls)


def test_streamed_arguments_arrive_before_the_call_ends():
    parser = TOOL_PARSERS["hermes"]()
    first = parser.extract_streaming('<tool_call>\n{"name": "f", "arguments": {"a": "xy')
    assert first.tool_calls[0].function.name == "f"
    assert first.tool_calls[0].function.arguments == '{"a": "xy'
    more = parser.extract_streaming('z"}}\n</tool_call>', final=True)
    assert more.tool_calls[0].function.arguments == 'z"}'
    assert parser.called_tools


def test_unfinished_call_at_the_end():
    # The name arrived: a call with the arguments as far as they went; else plain text.
    partial = TOOL_PARSERS["hermes"]().extract('<tool_call>{"name": "f", "arguments": {"a": 1')
    assert [c.function.name for c in partial.tool_calls] == ["f"]
    nameless = TOOL_PARSERS["hermes"]().extract('x <tool_call>{"na')
    assert nameless.tool_calls == [] and nameless.content == 'x <tool_call>{"na'
    not_json = TOOL_PARSERS["hermes"]().extract("<tool_call>not json</tool_call> after")
    assert not_json.tool_calls == [] and "not json" in not_json.content


def test_call_without_arguments_gets_an_empty_object():
    extracted = TOOL_PARSERS["hermes"]().extract('<tool_call>{"name": "now"}</tool_call>')
    assert extracted.tool_calls[0].function.arguments == "{}"
    _assert_stream_matches(
        TOOL_PARSERS["hermes"],
        '<tool_call>{"name": "now"}</tool_call>',
        list('<tool_call>{"name": "now"}</tool_call>'),
    )


REQUIRED_OUTPUT = (
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {}}]'
)


def test_required_and_named_parsers():
    extracted = RequiredToolParser().extract(REQUIRED_OUTPUT)
    assert extracted.content is None
    assert _calls(extracted) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    for k in range(len(REQUIRED_OUTPUT) + 1):
        chunks = [REQUIRED_OUTPUT[:k], REQUIRED_OUTPUT[k:]]
        _assert_stream_matches(RequiredToolParser, REQUIRED_OUTPUT, chunks)
    named = NamedFunctionParser("get_weather").extract(' {"city": "Paris"}\n')
    assert _calls(named) == [("get_weather", {"city": "Paris"})] and named.content is None
    text = '{"city": "Paris"}'
    for k in range(len(text) + 1):
        _assert_stream_matches(lambda: NamedFunctionParser("f"), text, [text[:k], text[k:]])


QWEN3_THINKING = (
    "<think>\nThe user wants the weather in Paris; I should call the tool.\n</think>\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


@pytest.mark.parametrize(
    ("name", "text", "reasoning", "content"),
    [
        ("qwen3", "<think>a < b</think>\n\nThe answer.", "a < b", "The answer."),
        ("qwen3", "No thinking here </think> at all", None, "No thinking here </think> at all"),
        ("qwen3", "<think>still thinking", "still thinking", None),
        ("deepseek_r1", "reasoning first</think>Answer", "reasoning first", "Answer"),
        ("deepseek_r1", "<think>r</think>\nA", "r", "A"),
        ("deepseek_r1", "never closed", "never closed", None),
    ],
)
def test_reasoning_parsers(name, text, reasoning, content):
    new_parser = REASONING_PARSERS[name]
    split = new_parser().extract(text)
    assert (split.reasoning, split.content) == (reasoning, content)
    for chunks in [[text[:k], text[k:]] for k in range(len(text) + 1)] + [[*text, ""]]:
        parser = new_parser()
        got = [
            parser.extract_streaming(c, final=i == len(chunks) - 1) for i, c in enumerate(chunks)
        ]
        streamed_reasoning = "".join(d.reasoning or "" for d in got) or None
        streamed_content = "".join(d.content or "" for d in got) or None
        assert (streamed_reasoning, streamed_content) == (reasoning, content), chunks


def test_reasoning_then_tool_calls_stream_like_the_whole():
    parsing = OutputParsing(REASONING_PARSERS["qwen3"], TOOL_PARSERS["hermes"])
    message = parsing.choice().message(QWEN3_THINKING)
    assert message.reasoning_content.startswith("\nThe user wants")
    assert message.content is None
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    for k in range(len(QWEN3_THINKING) + 1):
        choice = parsing.choice()
        deltas = [
            choice.delta(QWEN3_THINKING[:k], final=False),
            choice.delta(QWEN3_THINKING[k:], final=True),
        ]
        assert "".join(d.reasoning_content or "" for d in deltas) == message.reasoning_content
        assert not any(d.content for d in deltas)
        arguments = "".join(
            c.function.arguments or "" for d in deltas for c in (d.tool_calls or [])
        )
        assert arguments == message.tool_calls[0].function.arguments
        assert choice.called_tools


def test_json_scan():
    text = '{"a": "x}", "b": [1, {"c": null}], "d": -1.5e3}'
    scan = scan_object(text, 0)
    assert scan.end == len(text)
    assert scan.text_of(text, "b") == '[1, {"c": null}]'
    assert scan.string_of(text, "a") == "x}"
    assert value_end("12", 0) is None and value_end("12,", 0) == 2
    assert value_end("tr", 0) is None
    with pytest.raises(NotJSON):
        value_end("xyz", 0)
    with pytest.raises(NotJSON):
        scan_object('{"a" 1}', 0)


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=400)))
def test_stream_random_splits(case, cuts):
    family, text = case[0], case[1]
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    _assert_stream_matches(TOOL_PARSERS[family], text, chunks)
