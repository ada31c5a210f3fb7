"""Function calling over K2-Think: the tool prompt (the tool kinds it leaves out logged up to a bound), history,
extraction in every form (arguments nested too deeply stay text), streamed tool_calls."""

import json
import logging

import openai
import pytest
from conftest import (
    API_KEY,
    AUTH,
    CHAT,
    DEEP,
    DIALECTS,
    MESSAGES,
    MODEL,
    RESPONSES,
    TOOL_NAMES,
    asked,
    chat,
    read_sse,
    scan_answer,
    state_of,
)
from fake_site import Reply

import k2proxy

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Web search.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
TOOLS = [WEATHER, SEARCH]
WEATHER_QUESTION = [{"role": "user", "content": "Weather in Paris?"}]

ANSWERS = {
    "own": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            "Let me check.", [("get_weather", {"city": "Paris"})]),
    "fenced": ('I will look it up.\n```json\n{"tool_calls": [{"id": "call_model", "type": "function", "function": '
               '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"celsius\\"}"}}]}\n```',
               "I will look it up.", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    "inline": ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa}ris \\"q\\""}}]}',
               None, [("get_weather", {"city": 'Pa}ris "q"'})]),
    "natural": ("调用函数: get_weather 参数: {\"city\": \"巴黎\"}", None, [("get_weather", {"city": "巴黎"})]),
    "two": ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
            '<tool_call>{"name": "search", "arguments": {"q": "Paris events"}}</tool_call>',
            None, [("get_weather", {"city": "Paris"}), ("search", {"q": "Paris events"})]),
    "unrelated_json": ('Here is data: {"city": "Paris", "tool_calls": 3} and ```json\n{"a": [1, 2]}\n```',
                       'Here is data: {"city": "Paris", "tool_calls": 3} and ```json\n{"a": [1, 2]}\n```', []),
    "unknown_tool": ('{"tool_calls": [{"name": "rm_rf", "arguments": {}}]}',
                     '{"tool_calls": [{"name": "rm_rf", "arguments": {}}]}', []),
}


def scan(text, step):
    out = scan_answer(TOOL_NAMES, text, step)
    return ("".join(p for p in out if isinstance(p, str)),
            [(p.name, json.loads(p.arguments)) for p in out if isinstance(p, k2proxy.ToolCall)])


@pytest.mark.parametrize("form", ANSWERS)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_scanner_finds_each_form_at_any_split(form, step):
    answer, text, calls = ANSWERS[form]
    found_text, found_calls = scan(answer, step)
    assert found_calls == calls
    assert found_text.strip() == (text or "")


def test_scanner_releases_text_that_cannot_open_a_call_at_once():
    scanner = k2proxy.ToolCallScanner(TOOL_NAMES)
    assert scanner.feed("Hello world. ") == ["Hello world. "]
    assert scanner.feed("Use x < y and `a`, ") == ["Use x < y and `a`, "]
    assert "".join(scanner.feed("a dict {")) == "a dict "
    assert scanner.feed('"k": 1}') == ['{"k": 1}']
    for prose in ("Wrap calls in a <tool_call> block. More prose. ", "Use `<tool_call>` blocks. "):
        assert "".join(scanner.feed(prose)) == prose


@pytest.mark.parametrize("body", ['\n```json\n{"name": "search", "arguments": {"q": "k2"}}\n```\n',
                                  '[{"name": "search", "arguments": {"q": "k2"}}]'], ids=["fenced", "list"])
def test_other_bodies_inside_the_tag_are_still_calls(body):
    assert scan(f"<tool_call>{body}</tool_call>", 2) == ("", [("search", {"q": "k2"})])


def test_model_made_ids_are_replaced_by_unique_ones():
    plan = k2proxy.ToolPlan((k2proxy.Tool("search", "", {}),), "auto")
    progress = k2proxy.Progress(plan, show_reasoning=True)
    answer = '{"tool_calls": [{"id": "call_x", "name": "search", "arguments": {}}, {"id": "call_x", "name": "search"}]}'
    events = progress.events(k2proxy.Delta("", answer)) + progress.closing(prompt_tokens=1)
    starts = [e for e in events if isinstance(e, k2proxy.ToolCallStart)]
    assert len(starts) == 2 and len({s.id for s in starts}) == 2
    assert all(s.id != "call_x" and "call_x" not in s.id for s in starts)


def test_tool_prompt_describes_everything_without_truncation():
    long_description = "Returns the weather. " * 200
    tool = json.loads(json.dumps(WEATHER))
    tool["function"]["description"] = long_description
    plan = k2proxy.chat_tools({"tools": [tool, SEARCH], "tool_choice": "required"}, True)
    prompt = k2proxy.tool_prompt(plan)
    assert long_description.strip() in prompt
    assert "- city (string, required): City name" in prompt
    assert '"celsius", "fahrenheit"' in prompt and "### search" in prompt and "<tool_call>" in prompt
    assert "must call at least one tool" in prompt
    named = k2proxy.chat_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "search"}}},
                               True)
    assert 'must call the tool "search"' in k2proxy.tool_prompt(named)


@pytest.fixture
async def sdk(proxy):
    return openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key=API_KEY, max_retries=0)


async def sdk_call(sdk, stream, **extra):
    """(content, tool calls as (name, arguments), finish reason, call ids) as the openai SDK sees them."""
    request = {"model": "IFM/K2-Horizon-375B-A23B", "messages": WEATHER_QUESTION, "tools": TOOLS, **extra}
    if not stream:
        choice = (await sdk.chat.completions.create(**request)).choices[0]
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        ids = [c.id for c in choice.message.tool_calls or []]
        assert all(i.startswith("call_") for i in ids)
        return choice.message.content, calls, choice.finish_reason, ids
    content, calls, finish, ids = "", {}, None, []
    async for chunk in await sdk.chat.completions.create(stream=True, **request):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            if piece.id:
                assert piece.type == "function" and piece.function.name and piece.index == len(calls)
                calls[piece.index] = [piece.function.name, ""]
                ids.append(piece.id)
            calls[piece.index][1] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content or None, [(name, json.loads(args)) for name, args in calls.values()], finish, ids


@pytest.mark.parametrize("form", ANSWERS)
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("frames", [{"style": "snapshot"}, {"style": "incremental"}, {"realtime_save": True}],
                         ids=["snapshot", "incremental", "realtime"])
async def test_sdk_sees_tool_calls_in_each_form(sdk, fake, form, stream, frames):
    answer, text, calls = ANSWERS[form]
    fake.reply = Reply(reasoning="I might call get_weather here.", answer=answer, piece=4, **frames)
    content, found, finish, _ = await sdk_call(sdk, stream)
    assert found == calls
    assert finish == ("tool_calls" if calls else "stop")
    assert (content or "").strip() == (text or "")
    if not stream and calls and not text:
        assert content is None


async def test_reasoning_that_mentions_a_tool_is_not_a_call(sdk, fake):
    fake.reply = Reply(reasoning='Maybe <tool_call>{"name": "get_weather", "arguments": {"city": "X"}}</tool_call>',
                       answer="No tool needed: it is sunny.")
    for stream in (True, False):
        content, calls, finish, _ = await sdk_call(sdk, stream)
        assert (content, calls, finish) == ("No tool needed: it is sunny.", [], "stop")


async def test_plain_answer_streams_before_upstream_finishes(proxy, fake):
    fake.reply = Reply(answer="Plain words, no tools at all. " * 20, piece=5, delay=0.03)
    response = await proxy.post("/v1/chat/completions", json=chat(stream=True, tools=TOOLS), headers=AUTH)
    async for line in response.content:
        if line.startswith(b"data: ") and b'"content"' in line:
            break
    assert fake.open_streams == 1
    response.close()


async def test_standard_tool_loop(sdk, fake):
    fake.script = [Reply(answer='<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'),
                   Reply(answer="It is 18 °C in Paris.")]
    first = await sdk.chat.completions.create(model="IFM/K2-Horizon-375B-A23B", messages=WEATHER_QUESTION, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    result = json.dumps({"temperature": 18, "unit": "celsius"})
    history = WEATHER_QUESTION + [first.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": result}]
    final = await sdk.chat.completions.create(model="IFM/K2-Horizon-375B-A23B", messages=history, tools=TOOLS)
    assert final.choices[0].message.content == "It is 18 °C in Paris."
    sent = fake.received[1].body["messages"]
    assert sent[0]["role"] == "system" and "get_weather" in sent[0]["content"]
    assert '"name": "get_weather", "arguments": {"city": "Paris"}' in sent[2]["content"]
    assert sent[3]["role"] == "user" and f'name="get_weather" tool_call_id="{call.id}"' in sent[3]["content"]
    assert result in sent[3]["content"]


async def test_streamed_tool_loop(sdk, fake):
    fake.script = [Reply(answer='{"tool_calls": [{"name": "search", "arguments": {"q": "k2"}}]}', style="incremental"),
                   Reply(answer="Found it.")]
    _, calls, finish, (call_id,) = await sdk_call(sdk, True)
    assert calls == [("search", {"q": "k2"})] and finish == "tool_calls"
    history = WEATHER_QUESTION + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "search", "arguments": '{"q": "k2"}'}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "K2-Think is a reasoning model."}]
    content, calls, finish, _ = await sdk_call(sdk, True, messages=history)
    assert (content, calls, finish) == ("Found it.", [], "stop")
    assert f'name="search" tool_call_id="{call_id}"' in fake.received[1].body["messages"][-1]["content"]


@pytest.mark.parametrize("env,choice", [({}, "none"), ({"TOOL_SUPPORT": "false"}, "auto")])
async def test_no_tool_text_and_no_parsing_when_off(make_proxy, fake, env, choice):
    proxy = await make_proxy(**env)
    answer = ANSWERS["own"][0]
    fake.reply = Reply(answer=answer)
    body = await (await proxy.post("/v1/chat/completions", json=chat(tools=TOOLS, tool_choice=choice),
                                   headers=AUTH)).json()
    assert body["choices"][0]["message"]["content"] == answer
    assert body["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in body["choices"][0]["message"]
    assert all("get_weather" not in m["content"] for m in fake.received[0].body["messages"])


@pytest.mark.parametrize("choice,fragment", [("required", "must call at least one tool"),
                                             ({"type": "function", "function": {"name": "search"}},
                                              'must call the tool "search"')])
async def test_tool_choice_is_stated_to_the_model(proxy, fake, choice, fragment):
    await proxy.post("/v1/chat/completions", json=chat(tools=TOOLS, tool_choice=choice), headers=AUTH)
    assert fragment in fake.received[0].body["messages"][0]["content"]


async def test_tool_prompt_joins_an_existing_system_message(proxy, fake):
    body = {"model": "IFM/K2-Horizon-375B-A23B", "tools": TOOLS,
            "messages": [{"role": "system", "content": "You are terse."}, *WEATHER_QUESTION]}
    await proxy.post("/v1/chat/completions", json=body, headers=AUTH)
    sent = fake.received[0].body["messages"]
    assert len(sent) == 2
    assert sent[0]["content"].startswith("You are terse.\n\n") and "get_weather" in sent[0]["content"]


@pytest.mark.parametrize("extra,param", [
    ({"tools": {"name": "x"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": ["get_weather"]}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": "x"}]}, "messages[0].tool_calls"),
])
async def test_bad_tool_input_is_400(proxy, fake, extra, param):
    response = await proxy.post("/v1/chat/completions", json={**chat(), **extra}, headers=AUTH)
    body = await response.json()
    assert response.status == 400 and body["error"]["param"] == param and fake.received == []


async def test_stream_chunks_for_a_call_have_the_openai_shape(proxy, fake):
    fake.reply = Reply(answer=ANSWERS["own"][0])
    response = await proxy.post("/v1/chat/completions", json=chat(stream=True, tools=TOOLS), headers=AUTH)
    events, _ = await read_sse(response)
    pieces = [e["choices"][0]["delta"]["tool_calls"][0] for e in events[:-1]
              if "tool_calls" in e["choices"][0]["delta"]]
    assert pieces[0]["index"] == 0 and pieces[0]["type"] == "function" and pieces[0]["function"] == {
        "name": "get_weather", "arguments": ""}
    assert pieces[1] == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert "<tool_call>" not in json.dumps(events)


async def test_tool_kinds_left_out_are_remembered_and_logged_up_to_a_bound(proxy, fake, caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    for number in range(k2proxy.TOOL_KINDS_NOTED + 10):
        tools = [{"type": f"server_tool_{number}_" + "y" * 500, "name": "x"}]
        await proxy.post("/v1/messages", json={"model": MODEL, "max_tokens": 10, "tools": tools,
                                               "messages": [{"role": "user", "content": "hi"}]}, headers=AUTH)
    assert len(state_of(proxy).tools_left_out) == k2proxy.TOOL_KINDS_NOTED
    assert caplog.text.count("are left out of the prompt") == k2proxy.TOOL_KINDS_NOTED
    assert "y" * (k2proxy.TOOL_KIND_CHARS + 1) not in caplog.text


@pytest.mark.parametrize("path", [MESSAGES, RESPONSES])
async def test_tool_kinds_left_out_are_noted_up_to_a_bound_each_cut_and_escaped(proxy, fake, caplog, path):
    caplog.set_level(logging.INFO, logger="k2proxy")
    built_in = "web_search_" if path == RESPONSES else "kind_"  # Responses refuses a type that is no built-in tool
    tools = [{"type": f"{built_in}{number}\nFORGED " + "y" * 300, "name": "x"} for number in range(150)]
    response = await proxy.post(path, json=asked(path, tools=tools), headers=AUTH)
    assert response.status == 200
    noted = [r.getMessage() for r in caplog.records if "left out of the prompt" in r.getMessage()]
    assert len(noted) == len(state_of(proxy).tools_left_out) < 150, "a bound, whatever clients send"
    assert not any(line.startswith("FORGED") for line in caplog.text.splitlines())
    assert len(noted) == k2proxy.TOOL_KINDS_NOTED
    assert all(len(kind) <= k2proxy.TOOL_KIND_CHARS for kind in state_of(proxy).tools_left_out)
    assert "y" * (k2proxy.TOOL_KIND_CHARS + 1) not in caplog.text and "\\nFORGED" in caplog.text


@DIALECTS
async def test_a_models_tool_call_nested_too_deeply_stays_text(proxy, fake, path):
    fake.reply = Reply(answer='<tool_call>{"name": "f", "arguments": ' + DEEP + "}</tool_call>")
    schema = {"type": "object"}
    tools = {CHAT: [{"type": "function", "function": {"name": "f", "parameters": schema}}],
             MESSAGES: [{"name": "f", "input_schema": schema}],
             RESPONSES: [{"type": "function", "name": "f", "parameters": schema}]}[path]
    response = await proxy.post(path, json=asked(path, tools=tools), headers=AUTH)
    text = json.dumps(await response.json())
    assert response.status == 200 and "[[[[" in text
    assert '"tool_calls"' not in text and '"tool_use"' not in text and '"function_call"' not in text
