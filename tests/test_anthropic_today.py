"""What today's Claude Code and Anthropic clients send, through the anthropic SDK: structured output, system
messages mid-conversation and directives, server tools, subagents' sessions, forced tools answered with bare
JSON, and a request captured from the real CLI."""

import json
from pathlib import Path

import anthropic
import pydantic
import pytest
from conftest import API_KEY, CLIENTS, MODEL
from fake_api import ApiReply
from fake_site import Reply

FIXTURES = Path(__file__).parent / "fixtures"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
          "required": ["city", "rank"], "additionalProperties": False}
STREAMED = pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
RECORD = {"name": "record", "description": "Record a person.", "input_schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"]}}
EMAIL = {"name": "email", "description": "Send an email.", "input_schema": {
    "type": "object", "properties": {"to": {"type": "string"}}, "required": ["to"]}}


@pytest.fixture
async def sdk(make_proxy):
    """The anthropic SDK on a proxy in front of the fake site (settings as keywords)."""
    made = []

    async def start(**env):
        proxy = await make_proxy(**env)
        made.append(anthropic.AsyncAnthropic(base_url=str(proxy.make_url("")).rstrip("/"), api_key=API_KEY,
                                             max_retries=0, timeout=20))
        return made[-1]
    yield start
    for client in made:
        await client.close()


@pytest.fixture
async def api_sdk(api_proxy):
    """The anthropic SDK on a proxy in front of the fake IFM API."""
    proxy = await api_proxy()
    client = anthropic.AsyncAnthropic(base_url=str(proxy.make_url("")).rstrip("/"), api_key=API_KEY,
                                      max_retries=0, timeout=20)
    yield client
    await client.close()


async def ask(client, stream, **options):
    """The final Message, streamed (the SDK's own accumulator) or not."""
    options = {"model": "claude-opus-4-8", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hi"}],
               **options}
    if not stream:
        return await client.messages.create(**options)
    async with client.messages.stream(**options) as events:
        return await events.get_final_message()


def text_of(message):
    return "".join(block.text for block in message.content if block.type == "text")


# ─── 1. structured output

@STREAMED
@pytest.mark.parametrize("field", ["output_config", "output_format"])
async def test_structured_output_on_the_site_is_stated_to_the_model_and_taken_out_of_its_answer(sdk, fake, stream,
                                                                                              field):
    fake.reply = Reply(answer='Here it is:\n```json\n{"city": "Paris", "rank": 1}\n```\nAnything else?')
    given = ({"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}} if field == "output_config"
             else {"extra_body": {"output_format": {"type": "json_schema", "schema": SCHEMA}}})
    message = await ask(await sdk(), stream, **given)
    assert json.loads(text_of(message)) == {"city": "Paris", "rank": 1}
    system = fake.received[-1].body["messages"][0]
    assert system["role"] == "system" and '"required": ["city", "rank"]' in system["content"]


class Place(pydantic.BaseModel):
    city: str
    rank: int


async def test_the_sdks_parse_reads_the_answer_as_its_model(sdk, fake):
    fake.reply = Reply(answer='{"city": "Lyon", "rank": 3}')
    parsed = await (await sdk()).messages.parse(model="claude-opus-4-8", max_tokens=1024, output_format=Place,
                                               messages=[{"role": "user", "content": "Where?"}])
    assert parsed.parsed_output == Place(city="Lyon", rank=3)


@STREAMED
async def test_structured_output_on_the_api_goes_as_its_response_format(api_sdk, fake_api, stream):
    fake_api.reply = ApiReply(json_answer={"city": "Oslo", "rank": 2})
    message = await ask(api_sdk, stream, output_config={"format": {"type": "json_schema", "schema": SCHEMA}})
    assert json.loads(text_of(message)) == {"city": "Oslo", "rank": 2}
    sent = fake_api.received[-1].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == SCHEMA


@STREAMED
async def test_an_answer_without_the_json_asked_for_is_the_documented_error(sdk, fake, stream):
    fake.reply = Reply(answer="I would rather write prose.")
    with pytest.raises(anthropic.APIStatusError) as raised:
        await ask(await sdk(), stream, output_config={"format": {"type": "json_schema", "schema": SCHEMA}})
    assert raised.value.status_code == 502 and "JSON" in str(raised.value)


async def test_a_format_that_is_no_json_schema_is_a_400_naming_it(sdk):
    with pytest.raises(anthropic.BadRequestError) as raised:
        await ask(await sdk(), False, output_config={"format": {"type": "xml"}})
    assert "output_config.format.type" in str(raised.value)


# ─── 2. system messages mid-conversation, and directives

MIDDLE = [{"role": "user", "content": "First question."}, {"role": "system", "content": "Answer in French."},
          {"role": "assistant", "content": "Réponse."}, {"role": "user", "content": "Second question."}]


def roles_and_texts(messages):
    return [(m["role"], m["content"]) for m in messages]


async def test_a_system_message_mid_conversation_is_a_note_in_its_place_on_the_site(sdk, fake):
    await ask(await sdk(), False, system="Be brief.", messages=MIDDLE)
    sent = roles_and_texts(fake.received[-1].body["messages"])
    assert [role for role, _ in sent] == ["system", "user", "user", "assistant", "user"]
    assert sent[2] == ("user", "<system-reminder>\nAnswer in French.\n</system-reminder>")


async def test_on_the_api_no_system_role_comes_after_the_first_and_the_prefix_stays_the_same(api_sdk, fake_api):
    turn_one = MIDDLE[:2]
    await ask(api_sdk, False, system="Be brief.", messages=turn_one)
    first = fake_api.received[-1].body["messages"]
    await ask(api_sdk, False, system="Be brief.", messages=[*turn_one, {"role": "assistant", "content": "Hello."},
                                                            {"role": "user", "content": "More."}])
    second = fake_api.received[-1].body["messages"]
    assert [m["role"] for m in second].count("system") == 1 and second[0]["role"] == "system"
    assert second[:len(first)] == first, "the conversation so far is sent as it was: IFM's cache still holds"


@pytest.mark.parametrize("effort,sent", [("low", "low"), ("medium", "medium"), ("max", "high")])
async def test_a_directive_sets_the_effort_and_sends_nothing(sdk, fake, effort, sent):
    directive = {"role": "system", "content": "", "output_config": {"effort": effort}}
    await ask(await sdk(), False, output_config={"effort": "high"},
              messages=[{"role": "user", "content": "Hi"}, directive])
    received = fake.received[-1]
    assert received.effort == sent and [m["role"] for m in received.body["messages"]] == ["user"]


# ─── 3. server tools

WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
SERVER_TOOL_RESULTS = {"web_search_20250305": "web_search_tool_result", "web_fetch_20250910": "web_fetch_tool_result",
                       "code_execution_20250825": "code_execution_tool_result", "advisor_20260301":
                       "advisor_tool_result"}


@STREAMED
@pytest.mark.parametrize("kind", SERVER_TOOL_RESULTS)
async def test_a_server_tool_is_answered_as_unavailable_in_anthropics_shape_without_the_model(sdk, fake, stream,
                                                                                            kind):
    name = kind.rsplit("_", 1)[0]
    message = await ask(await sdk(), stream, tools=[{"type": kind, "name": name}],
                        messages=[{"role": "user", "content": "Search the web for k2 at https://example.org/k2"}])
    use, result = (block if isinstance(block, dict) else block.model_dump(exclude_none=True)
                   for block in message.content)  # the advisor's result is a beta type: a dict to this SDK
    assert use["type"] == "server_tool_use" and use["name"] == name and use["id"].startswith("srvtoolu_")
    assert result["type"] == SERVER_TOOL_RESULTS[kind] and result["tool_use_id"] == use["id"]
    assert result["content"] == {"type": f"{SERVER_TOOL_RESULTS[kind]}_error", "error_code": "unavailable"}
    assert message.stop_reason == "end_turn" and fake.received == [], "the model was not asked"
    if name == "web_search":
        assert use["input"] == {"query": "Search the web for k2 at https://example.org/k2"}
    if name == "web_fetch":
        assert use["input"] == {"url": "https://example.org/k2"}


async def test_beside_custom_tools_a_server_tool_is_never_offered_to_the_model(sdk, fake, api_sdk, fake_api):
    await ask(await sdk(), False, tools=[WEB_SEARCH, EMAIL])
    prompt = fake.received[-1].body["messages"][0]["content"]
    assert "email" in prompt and "web_search" not in prompt
    await ask(api_sdk, False, tools=[WEB_SEARCH, EMAIL])
    assert [tool["function"]["name"] for tool in fake_api.received[-1].body["tools"]] == ["email"]


async def test_a_server_tools_use_and_result_sent_back_in_history_are_accepted(sdk, fake):
    history = [{"role": "user", "content": "Search."},
               {"role": "assistant", "content": [
                   {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "k2"}},
                   {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
                    "content": {"type": "web_search_tool_result_error", "error_code": "unavailable"}},
                   {"type": "text", "text": "Search is unavailable."}]},
               {"role": "user", "content": "Fine."}]
    message = await ask(await sdk(), False, messages=history)
    assert text_of(message) == fake.reply.answer
    assert fake.received[-1].body["messages"][1]["content"] == "Search is unavailable."


# ─── 4. subagents

async def test_a_subagent_has_a_session_of_its_own_and_no_raw_id_goes_upstream(api_sdk, fake_api):
    session = "6f3c1a0e-9b7d-4c2e-8a51-3d2f0e4b7c19"
    main = {"x-claude-code-session-id": session}
    for headers in (main, main, {**main, "x-claude-code-agent-id": "agent-7"},
                    {**main, "x-claude-code-agent-id": "agent-8"}):
        await ask(api_sdk, False, extra_headers=headers)
    sent = [record.session_id for record in fake_api.received]
    assert sent[0] == sent[1], "the main thread's session is stable"
    assert len(set(sent)) == 3, "each subagent has its own"
    assert not any(raw in value for value in sent for raw in (session, "agent-7", "agent-8"))
    assert not any(session in json.dumps(record.body) for record in fake_api.received)


# ─── 5. a forced tool answered with bare JSON is the call

BARE = 'Sure: {"name": "Ada", "age": 36}'


@STREAMED
@pytest.mark.parametrize("kind", ["chat", "anthropic", "responses"])
@pytest.mark.parametrize("choice", ["named", "required"])
async def test_a_forced_tool_answered_with_bare_json_is_that_tools_call_in_every_dialect(make_proxy, fake, stream,
                                                                                        kind, choice):
    fake.reply = Reply(answer=BARE)
    proxy = await make_proxy()
    client = CLIENTS[kind](str(proxy.make_url("")).rstrip("/"), stream)
    try:
        assert await forced_call(client, kind, choice, [RECORD, EMAIL]) == ("record", {"name": "Ada", "age": 36})
    finally:
        await client.sdk.close()


@pytest.mark.parametrize("answer", ['Sure: {"name": "Ada"}', 'Sure: {"name": "Ada", "age": "old"}', "No JSON."])
async def test_json_that_fits_no_forced_tool_is_answered_as_text(make_proxy, fake, answer):
    fake.reply = Reply(answer=answer)
    proxy = await make_proxy()
    client = CLIENTS["anthropic"](str(proxy.make_url("")).rstrip("/"), False)
    try:
        message = await client.sdk.messages.create(model=MODEL, max_tokens=512, tools=[RECORD],
                                                   tool_choice={"type": "tool", "name": "record"},
                                                   messages=[{"role": "user", "content": "Record Ada."}])
    finally:
        await client.sdk.close()
    assert [block.type for block in message.content] == ["text"] and text_of(message) == answer


async def forced_call(client, kind, choice, tools):
    """(name, arguments) of the call a dialect's client gets under a forced tool choice, streamed or not."""
    prompt = [{"role": "user", "content": "Record Ada, 36."}]
    if kind == "anthropic":
        tool_choice = {"type": "tool", "name": "record"} if choice == "named" else {"type": "any"}
        options = {"model": MODEL, "max_tokens": 512, "tools": tools, "tool_choice": tool_choice, "messages": prompt}
        if client.stream:
            async with client.sdk.messages.stream(**options) as events:
                message = await events.get_final_message()
        else:
            message = await client.sdk.messages.create(**options)
        use = next(block for block in message.content if block.type == "tool_use")
        assert message.stop_reason == "tool_use"
        return use.name, use.input
    functions = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                   "parameters": t["input_schema"]}} for t in tools]
    if kind == "chat":
        tool_choice = {"type": "function", "function": {"name": "record"}} if choice == "named" else "required"
        options = {"model": MODEL, "messages": prompt, "tools": functions, "tool_choice": tool_choice}
        if not client.stream:
            call = (await client.sdk.chat.completions.create(**options)).choices[0].message.tool_calls[0]
            return call.function.name, json.loads(call.function.arguments)
        name, arguments = None, []
        async for chunk in await client.sdk.chat.completions.create(**options, stream=True):
            for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                name = piece.function.name or name
                arguments.append(piece.function.arguments or "")
        return name, json.loads("".join(arguments))
    responses_tools = [{"type": "function", **f["function"]} for f in functions]
    tool_choice = {"type": "function", "name": "record"} if choice == "named" else "required"
    options = {"model": MODEL, "input": prompt, "tools": responses_tools, "tool_choice": tool_choice}
    if client.stream:
        async with client.sdk.responses.stream(**options) as events:
            response = await events.get_final_response()
    else:
        response = await client.sdk.responses.create(**options)
    call = next(item for item in response.output if item.type == "function_call")
    return call.name, json.loads(call.arguments)


# ─── 6. a request captured from the real CLI, and what has no meaning here

@pytest.mark.parametrize("capture", sorted(FIXTURES.glob("claude-code-*-messages.json")), ids=lambda p: p.stem)
async def test_a_request_captured_from_claude_code_is_answered(proxy, fake, capture):
    captured = json.loads(capture.read_text(encoding="utf-8"))
    response = await proxy.post("/v1/messages?beta=true", json=captured["body"],
                                headers={**captured["headers"], "x-api-key": API_KEY})
    assert response.status == 200 and response.content_type == "text/event-stream"
    assert fake.reply.answer in (await response.read()).decode()
    sent = fake.received[-1].body["messages"]
    assert [m["role"] for m in sent].count("system") == 1 and sent[0]["role"] == "system"
    assert fake.received[-1].effort == captured["body"]["output_config"]["effort"].replace("max", "high")


@pytest.mark.parametrize("effort,sent", [("low", "low"), ("medium", "medium"), ("high", "high"), ("xhigh", "high"),
                                         ("max", "high")])
async def test_what_has_no_meaning_here_is_accepted_and_ignored(proxy, fake, effort, sent):
    captured = json.loads((FIXTURES / "claude-code-2.1.332-messages.json").read_text(encoding="utf-8"))
    body = captured["body"]
    body["output_config"] = {"effort": effort}
    body["messages"] = [m for m in body["messages"] if m["role"] != "system"]
    body["messages"][0]["content"][-1]["cache_control"] = {"type": "ephemeral", "ttl": "1h", "scope": "global"}
    body["tools"][0].update(input_examples=[{"prompt": "x"}], defer_loading=True, eager_input_streaming=True)
    body["context_management"] = {"edits": [{"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens",
                                                                                              "value": 30000}}]}
    body["thinking"] = {"type": "adaptive"}
    response = await proxy.post("/v1/messages", json=body, headers={
        "x-api-key": API_KEY, "anthropic-version": "2023-06-01",
        "anthropic-beta": "fine-grained-tool-streaming-2025-05-14,any-future-beta-2027-01-01"})
    assert response.status == 200 and fake.received[-1].effort == sent


def test_the_docs_name_every_request_field_the_sdk_knows_and_each_block_type():
    import anthropic.types as types
    text = (Path(__file__).parent.parent / "docs" / "anthropic.md").read_text(encoding="utf-8")
    fields = set(types.message_create_params.MessageCreateParamsBase.__annotations__)
    missing = sorted(name for name in fields if f"`{name}" not in text)
    assert missing == []
    for block in ("text", "image", "document", "tool_result", "tool_use", "thinking", "redacted_thinking",
                  "server_tool_use"):
        assert f"`{block}`" in text, block
