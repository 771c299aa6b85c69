"""Tool calling and reasoning through /v1/chat/completions with the official `openai` client.

The tiny random model cannot write tool calls, so `tool_server` runs with
scripted_outputs/sitecustomize.py: a prompt holding `SCRIPT=<key>` gets a scripted reply (in
pieces, as a model's), and structured outputs pass the core unenforced. Everything else is
the real server: template rendering (tests/server/templates/chatml_tools.jinja), the parsers,
the response and stream shapes, the flags."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from kestrel_server.chat import message_dicts, tool_dicts
from kestrel_server.protocol import ChatCompletionRequest
from kestrel_server.tool_choice import ToolSettings, plan_tools, required_schema
from kestrel_server.tool_parsers import TOOL_PARSERS
from tests.server.harness import ServerProcess, start_server

HERE = Path(__file__).parent
TEMPLATE = HERE / "templates" / "chatml_tools.jinja"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]

SCRIPTS = {
    "weather": (
        "<think>\nThe user asks about Paris.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
        "</tool_call>\n"
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    ),
    "plain": "<think>nothing to call</think>It is sunny.",
    "required": '[{"name": "get_time", "arguments": {}}]',
    "named": '{"city": "Oslo"}',
}


@pytest.fixture(scope="module")
def tool_server(tiny_model, tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "tools.log"
    env = {
        "PYTHONPATH": str(HERE / "scripted_outputs"),
        "KESTREL_TEST_SCRIPTS": json.dumps(SCRIPTS),
        "KESTREL_TEST_TOKENIZER": str(Path(tiny_model) / "tokenizer.json"),
    }
    proc = start_server(
        tiny_model, log,
        "--chat-template", str(TEMPLATE),
        "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
        "--reasoning-parser", "qwen3",
        env=env,
    )  # fmt: skip
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tools_client(tool_server):
    with openai.OpenAI(
        base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=60
    ) as c:
        yield c


def _ask(key: str) -> list[dict]:
    return [{"role": "user", "content": f"SCRIPT={key} What is the weather in Paris?"}]


def test_auto_tool_calls_and_reasoning(tools_client):
    response = tools_client.chat.completions.create(
        model="tiny", messages=_ask("weather"), tools=TOOLS, max_tokens=40
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    message = choice.message
    assert message.content is None
    assert message.model_extra["reasoning_content"] == "\nThe user asks about Paris.\n"
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    assert calls == [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {})]
    assert all(c.type == "function" and c.id.startswith("call_") for c in message.tool_calls)


def test_auto_without_calls_is_content(tools_client):
    response = tools_client.chat.completions.create(
        model="tiny", messages=_ask("plain"), tools=TOOLS, max_tokens=40
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == "It is sunny."
    assert choice.message.tool_calls is None
    assert choice.message.model_extra["reasoning_content"] == "nothing to call"


def test_streamed_tool_calls_match_the_response(tools_client):
    whole = tools_client.chat.completions.create(
        model="tiny", messages=_ask("weather"), tools=TOOLS, max_tokens=40
    ).choices[0]
    calls: dict[int, dict] = {}
    reasoning, content, finish = [], [], []
    stream = tools_client.chat.completions.create(
        model="tiny", messages=_ask("weather"), tools=TOOLS, max_tokens=40, stream=True
    )
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
            content.append(delta.content or "")
            for part in delta.tool_calls or []:
                if part.index not in calls:
                    assert part.id and part.type == "function" and part.function.name
                    calls[part.index] = {"name": part.function.name, "arguments": ""}
                else:
                    assert part.id is None and part.function.name is None
                calls[part.index]["arguments"] += part.function.arguments or ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    assert finish == ["tool_calls"]
    assert "".join(content) == ""
    assert "".join(reasoning) == whole.message.model_extra["reasoning_content"]
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments}
        for c in whole.message.tool_calls
    ]


def test_streamed_choices_each_finish_once(tools_client):
    stream = tools_client.chat.completions.create(
        model="tiny", messages=_ask("weather"), tools=TOOLS, max_tokens=40, n=2, stream=True
    )
    finishes: dict[int, list[str]] = {0: [], 1: []}
    names: dict[int, list[str]] = {0: [], 1: []}
    for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
            names[choice.index] += [
                p.function.name for p in choice.delta.tool_calls or [] if p.function.name
            ]
    assert finishes == {0: ["tool_calls"], 1: ["tool_calls"]}
    assert names == {0: ["get_weather", "get_time"], 1: ["get_weather", "get_time"]}


def test_history_with_tool_calls_and_results(tools_client):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    response = tools_client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert response.choices[0].message.tool_calls is None
    assert response.usage.prompt_tokens > 0


def test_tokenize_renders_tools(tool_server):
    import httpx

    messages = [{"role": "user", "content": "hi"}]
    plain = httpx.post(tool_server.url + "/tokenize", json={"messages": messages}).json()
    with_tools = httpx.post(
        tool_server.url + "/tokenize", json={"messages": messages, "tools": TOOLS}
    ).json()
    assert with_tools["count"] > plain["count"] + 20


def test_required_and_named_choices_parse_the_constrained_json(tools_client):
    # Scripted replies stand in for the grammar-constrained output (the core lets the
    # structured_outputs through unenforced here).
    required = tools_client.chat.completions.create(
        model="tiny", messages=_ask("required"), tools=TOOLS, tool_choice="required", max_tokens=40
    ).choices[0]
    assert required.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in required.message.tool_calls] == [
        ("get_time", "{}")
    ]
    named = tools_client.chat.completions.create(
        model="tiny",
        messages=_ask("named"),
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        stream=True,
    )
    parts = [p for chunk in named for c in chunk.choices for p in c.delta.tool_calls or []]
    assert parts[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in parts) == '{"city": "Oslo"}'


PICK_TOOL = {
    "type": "function",
    "function": {
        "name": "pick",
        "parameters": {
            "type": "object",
            "properties": {"color": {"enum": ["red", "blue"]}},
            "required": ["color"],
            "additionalProperties": False,
        },
    },
}


def test_required_choice_is_enforced_by_the_engine(client):
    response = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        tools=[PICK_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "pick"
    assert json.loads(call.function.arguments)["color"] in ("red", "blue")


def test_named_choice_is_enforced_by_the_engine(client):
    response = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        tools=[PICK_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "pick"}},
        max_tokens=200,
        temperature=1.0,
        seed=3,
    )
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "pick"
    assert json.loads(call.function.arguments)["color"] in ("red", "blue")


def test_forced_tool_choice_and_response_format_together_are_a_400(client):
    err = _error(
        lambda: client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            tools=[PICK_TOOL],
            tool_choice="required",
            response_format={"type": "json_object"},
            max_tokens=4,
        )
    )
    assert err.body["param"] == "tool_choice"


def _error(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value


def test_auto_needs_the_flags(client):
    err = _error(
        lambda: client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, max_tokens=2
        )
    )
    assert err.body["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in err.message and "--tool-call-parser" in err.message
    # tool_choice "none" needs no flag.
    ok = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        tools=TOOLS,
        tool_choice="none",
        max_tokens=2,
    )
    assert ok.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL], "tool_choice": "none"}, None),
        (
            {"tools": TOOLS, "tool_choice": "none", "parallel_tool_calls": "yes"},
            "parallel_tool_calls",
        ),
    ],
)
def test_invalid_tool_fields_are_400s(client, extra, param):
    messages = [{"role": "user", "content": "hi"}]
    err = _error(
        lambda: client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=2, **extra
        )
    )
    if param is not None:
        assert (err.body["param"] or "").startswith(param), err.body


def test_tools_and_tool_calls_reach_the_template(tiny_model):
    from kestrel.tokenizer import Tokenizer

    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
            ],
            "tools": TOOLS,
        }
    )
    tokenizer = Tokenizer.from_dir(tiny_model)
    text = tokenizer.apply_chat_template(
        message_dicts(request.messages),
        True,
        tool_dicts(request.tools),
        TEMPLATE.read_text(),
    )
    assert json.dumps(WEATHER_TOOL) in text
    # Arguments reach the template as an object, so tojson writes JSON, not a quoted string.
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n21 C\n</tool_response>" in text


def test_schema_builders():
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required"}
    )
    plan = plan_tools(request, ToolSettings())
    schema = plan.structured_outputs.json
    assert schema == required_schema(request.tools)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    weather, time = schema["items"]["anyOf"]
    assert weather["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert weather["properties"]["arguments"] == WEATHER_TOOL["function"]["parameters"]
    assert time["properties"]["arguments"] == {"type": "object"}
    assert weather["required"] == ["name", "arguments"]
    single = required_schema(request.tools[:1], parallel_tool_calls=False)
    assert single["maxItems"] == 1 and single["items"]["properties"]["name"]["enum"] == [
        "get_weather"
    ]
    named = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
    )
    plan = plan_tools(named, ToolSettings())
    assert plan.structured_outputs.json == WEATHER_TOOL["function"]["parameters"]
    assert plan.new_parser().extract('{"city": "Rome"}').tool_calls[0].function.name == (
        "get_weather"
    )
    auto = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
    )
    plan = plan_tools(auto, ToolSettings(TOOL_PARSERS["hermes"], enable_auto_tool_choice=True))
    assert plan.structured_outputs is None and plan.new_parser is TOOL_PARSERS["hermes"]
    assert (
        plan_tools(
            ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]}),
            ToolSettings(),
        ).new_parser
        is None
    )


def test_cli_flags():
    from kestrel_server.cli import parse_args

    args = parse_args(
        ["serve", "m", "--tool-call-parser", "mistral", "--enable-auto-tool-choice",
         "--reasoning-parser", "deepseek_r1"]
    )  # fmt: skip
    assert (args.tool_call_parser, args.enable_auto_tool_choice, args.reasoning_parser) == (
        "mistral",
        True,
        "deepseek_r1",
    )
    with pytest.raises(SystemExit) as info:
        parse_args(["serve", "m", "--enable-auto-tool-choice"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["serve", "m", "--tool-call-parser", "nope"])
