"""The Anthropic Messages front door in-process: requests as Claude Code sends them, the stream's events, thinking,
tools, model mapping, effort, count_tokens, and errors in Anthropic's shape; and, through the anthropic SDK, what
today's Claude Code and Anthropic clients send: structured output, system messages mid-conversation and
directives, server tools, subagents' sessions, forced tools answered with bare JSON, a request captured from the
real CLI."""

import base64
import json
import time
from pathlib import Path

import anthropic
import pydantic
import pytest
from conftest import API_KEY, CLIENTS, MODEL, WHOLE_OR_STREAMED, effort_sent, pool_of, read_named_sse
from fake_api import ApiReply
from fake_site import Reply, make_jwt

import k2proxy

KEY = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
HI = [{"role": "user", "content": "hi"}]
REASONING = "The user greets me.\nI greet back."
ANSWER = "Hello — 你好!"
BASH = {"name": "Bash", "description": "Run a command.", "input_schema": {
    "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}
CALL = '<tool_call>{"name": "Bash", "arguments": {"command": "ls"}}</tool_call>'
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()


def request(**extra):
    return {"model": "claude-opus-4-8", "max_tokens": 1000, "messages": HI, **extra}


async def post(proxy, body, path="/v1/messages?beta=true", headers=KEY):
    return await proxy.post(path, json=body, headers=headers)


async def test_a_message_as_anthropic_sends_it(proxy, fake):
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER)
    response = await post(proxy, request(thinking={"type": "enabled", "budget_tokens": 2048}))
    body = await response.json()
    assert response.status == 200 and body["id"].startswith("msg_") and body["type"] == "message"
    assert body["model"] == "claude-opus-4-8" and body["role"] == "assistant"
    thinking, text = body["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == REASONING and thinking["signature"]
    assert text == {"type": "text", "text": ANSWER}
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    assert body["usage"]["input_tokens"] == 12 and body["usage"]["output_tokens"] == 34
    assert fake.received[0].body["model"] == MODEL


async def test_the_stream_is_a_sequence_of_named_events(proxy, fake):
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER, piece=4)
    response = await post(proxy, request(stream=True, thinking={"type": "adaptive"}))
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = await read_named_sse(response)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert all(name == data["type"] for name, data in events)
    starts = [data for name, data in events if name == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["thinking", "text"]
    assert [s["index"] for s in starts] == [0, 1]
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert "".join(d.get("thinking", "") for d in deltas) == REASONING
    assert "".join(d.get("text", "") for d in deltas) == ANSWER
    signature = [d for d in deltas if d["type"] == "signature_delta"]
    assert len(signature) == 1 and signature[0]["signature"]
    assert names.count("content_block_stop") == 2
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn" and events[-2][1]["usage"]["output_tokens"] == 34


@pytest.mark.parametrize("thinking,shown", [({"type": "disabled"}, None), (None, None),
                                            ({"type": "adaptive", "display": "omitted"}, ""),
                                            ({"type": "adaptive"}, REASONING)])
async def test_thinking_is_shown_only_when_enabled_and_not_omitted(proxy, fake, thinking, shown):
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER)
    body = await (await post(proxy, request(**({"thinking": thinking} if thinking else {})))).json()
    blocks = [b for b in body["content"] if b["type"] == "thinking"]
    assert [b["thinking"] for b in blocks] == ([] if shown is None else [shown])
    assert all(b["signature"] for b in blocks)
    streamed = request(stream=True, **({"thinking": thinking} if thinking else {}))
    events = await read_named_sse(await post(proxy, streamed))
    kinds = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert kinds == (["text"] if shown is None else ["thinking", "text"])
    assert "".join(d["delta"].get("thinking", "") for n, d in events if n == "content_block_delta") == (shown or "")


@pytest.mark.parametrize("extra,effort", [
    ({}, "high"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
    ({"thinking": {"type": "enabled", "budget_tokens": 8000}}, "medium"),
    ({"thinking": {"type": "enabled", "budget_tokens": 32000}}, "high"),
    ({"output_config": {"effort": "low"}}, "low"),
    ({"output_config": {"effort": "max"}, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "high"),
])
async def test_effort_comes_from_output_config_or_the_thinking_budget(proxy, fake, extra, effort):
    assert (await post(proxy, request(**extra))).status == 200
    assert effort_sent(fake) == effort


async def test_a_claude_code_request_is_taken_whole(proxy, fake):
    """What Claude Code 2.1 sends in its first request, trimmed: every field accepted, nothing wrong sent on."""
    body = {
        "model": "claude-opus-4-8", "max_tokens": 64000, "stream": False,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197;"},
                   {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>context</system-reminder>"},
            {"type": "text", "text": "Say hello", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "Available agent types: claude."}],
        "tools": [BASH, {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
        "tool_choice": {"type": "auto"}, "metadata": {"user_id": '{"device_id": "x"}'},
        "thinking": {"type": "adaptive"}, "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
        "output_config": {"effort": "high"}, "temperature": 1, "top_k": 40, "stop_sequences": ["STOP"]}
    response = await post(proxy, body)
    assert response.status == 200, await response.text()
    sent = fake.received[0].body
    system = sent["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("You are a Claude agent.")
    assert "billing-header" not in json.dumps(sent)
    assert "### Bash" in system["content"] and "web_search" not in system["content"]
    assert sent["messages"][1] == {"role": "user", "content": "<system-reminder>context</system-reminder>\nSay hello"}
    assert sent["messages"][2] == {"role": "user", "content": "<system-reminder>\nAvailable agent types: claude.\n"
                                                              "</system-reminder>"}, "a system message later on: a note"
    assert sent["params"] == {"temperature": 1, "max_tokens": k2proxy.MAX_OUTPUT_TOKENS, "stop": ["STOP"]}
    assert effort_sent(fake) == "high"


async def test_server_tools_are_named_once_in_the_log(proxy, fake, caplog):
    caplog.set_level("INFO", logger="k2proxy")
    for _ in range(3):
        await post(proxy, request(tools=[BASH, {"type": "web_search_20250305", "name": "web_search"}]))
    assert sum("web_search_20250305" in r.getMessage() for r in caplog.records) == 1


async def test_a_tool_call_round_trip(proxy, fake):
    fake.script = [Reply(reasoning="I need ls.", answer="Let me look. " + CALL), Reply(answer="Two files.")]
    first = await (await post(proxy, request(tools=[BASH]))).json()
    text, call = first["content"]
    assert text == {"type": "text", "text": "Let me look."} and first["stop_reason"] == "tool_use"
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_") and call["input"] == {"command": "ls"}
    history = HI + [{"role": "assistant", "content": [{"type": "thinking", "thinking": "I need ls.", "signature": "s"},
                                                      text, call]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"],
                                                  "content": [{"type": "text", "text": "a.txt\nb.txt"}]},
                                                 {"type": "text", "text": "And?"}]}]
    final = await (await post(proxy, request(tools=[BASH], messages=history))).json()
    assert final["content"] == [{"type": "text", "text": "Two files."}] and final["stop_reason"] == "end_turn"
    sent = fake.received[1].body["messages"]
    assert sent[-3]["role"] == "assistant" and sent[-3]["reasoning"] == "" and '"command": "ls"' in sent[-3]["content"]
    assert "I need ls." not in json.dumps(sent)
    assert sent[-2]["content"].startswith(f'<tool_result name="Bash" tool_call_id="{call["id"]}">')
    assert "b.txt" in sent[-2]["content"]
    assert sent[-1] == {"role": "user", "content": "And?"}


async def test_a_streamed_tool_call_is_a_tool_use_block_with_json_deltas(proxy, fake):
    fake.reply = Reply(answer=CALL, style="incremental", piece=5)
    events = await read_named_sse(await post(proxy, request(stream=True, tools=[BASH])))
    start = next(d for n, d in events if n == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    pieces = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"]
    assert json.loads("".join(pieces)) == {"command": "ls"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_a_failed_tool_is_told_to_the_model(proxy, fake):
    history = HI + [{"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash",
                                                       "input": {"command": "false"}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                                  "content": "Exit code 1"}]}]
    assert (await post(proxy, request(tools=[BASH], messages=history))).status == 200
    assert 'is_error="true"' in fake.received[0].body["messages"][-1]["content"]


@pytest.mark.parametrize("choice,fragment", [({"type": "any"}, "must call at least one tool"),
                                             ({"type": "tool", "name": "Bash"}, 'must call the tool "Bash"')])
async def test_tool_choice_is_stated_to_the_model(proxy, fake, choice, fragment):
    await post(proxy, request(tools=[BASH], tool_choice=choice))
    assert fragment in fake.received[0].body["messages"][0]["content"]


async def test_tool_choice_none_sends_no_tool_text(proxy, fake):
    fake.reply = Reply(answer=CALL)
    body = await (await post(proxy, request(tools=[BASH], tool_choice={"type": "none"}))).json()
    assert body["content"] == [{"type": "text", "text": CALL}]
    assert all("Bash" not in m["content"] for m in fake.received[0].body["messages"])


async def test_images_and_text_documents_reach_the_model(make_proxy, fake):
    proxy = await make_proxy(IMAGES="forward")
    content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
               {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
               {"type": "document", "title": "notes.md", "source": {"type": "text", "media_type": "text/plain",
                                                                    "data": "# Notes"}},
               {"type": "text", "text": "Compare."}]
    assert (await post(proxy, request(messages=[{"role": "user", "content": content}]))).status == 200
    parts = fake.received[0].body["messages"][-1]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    assert parts[1]["image_url"]["url"] == "https://example.com/cat.png"
    assert parts[2]["text"].startswith("File: notes.md\n") and "# Notes" in parts[2]["text"]


@pytest.mark.parametrize("env,asked,upstream,reasoning", [
    ({}, "claude-opus-4-8", MODEL, True),
    ({}, "claude-haiku-4-5-20251001", MODEL, True),
    ({"ANTHROPIC_MODEL_MAP": f"claude-haiku-*={MODEL}-nothink"}, "claude-haiku-4-5", MODEL, False),
    ({"ANTHROPIC_MODEL_MAP": f"claude-haiku-*={MODEL}-nothink, claude-haiku-4-5-x=k2"},
     "claude-haiku-4-5-x", MODEL, True),
    ({}, MODEL, MODEL, True), ({}, "MBZUAI-IFM/K2-Think-nothink", MODEL, False),
    ({"MODEL_ALIASES": f"k2={MODEL}"}, "k2", MODEL, True),
])
async def test_model_ids_map_to_upstream_and_echo_what_was_asked(make_proxy, fake, env, asked, upstream, reasoning):
    env.setdefault("MODEL_ALIASES", f"k2={MODEL}")
    proxy = await make_proxy(**env)
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER)
    body = await (await post(proxy, request(model=asked, thinking={"type": "adaptive"}))).json()
    assert body["model"] == asked and fake.received[-1].body["model"] == upstream
    assert any(b["type"] == "thinking" for b in body["content"]) == reasoning
    if not reasoning:
        assert effort_sent(fake) == "low"


async def test_count_tokens_counts_what_would_be_sent_and_asks_no_one(proxy, fake):
    small = await (await post(proxy, {"model": "claude-opus-4-8", "messages": HI}, "/v1/messages/count_tokens")).json()
    large = await (await post(proxy, {"model": "claude-opus-4-8", "messages": HI, "tools": [BASH],
                                      "system": "x" * 4000}, "/v1/messages/count_tokens")).json()
    assert set(small) == {"input_tokens"} and 0 < small["input_tokens"] < 10
    assert large["input_tokens"] > small["input_tokens"] + 1000
    assert fake.received == []


async def test_keys_by_x_api_key_or_bearer_and_any_anthropic_headers(proxy, fake):
    for headers in (KEY, {"Authorization": f"Bearer {API_KEY}"},
                    {"x-api-key": API_KEY, "anthropic-version": "1999-01-01", "anthropic-beta": "anything-at-all"}):
        assert (await post(proxy, request(), headers=headers)).status == 200
    response = await post(proxy, request(), headers={"x-api-key": "wrong"})
    assert response.status == 401 and (await response.json())["error"]["type"] == "authentication_error"


def anthropic_error(body):
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body,fragment", [
    ({"model": "claude-opus-4-8", "messages": HI}, "max_tokens"),
    (request(model=None), "model"),
    (request(messages=[]), "messages"),
    (request(messages=[{"role": "robot", "content": "x"}]), "role"),
    (request(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (request(messages=[{"role": "user", "content": [{"type": "audio"}]}]), "audio"),
    (request(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]), "source"),
    (request(messages=[{"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjcKAAEC"}}]}]), "cannot be read"),
    (request(messages=[{"role": "assistant", "content": [{"type": "tool_use", "id": 1, "name": "x"}]}]), "tool_use"),
    (request(max_tokens=0), "max_tokens"), (request(temperature=1.5), "temperature"),
    (request(stream="yes"), "stream"), (request(stop_sequences="STOP"), "stop_sequences"),
    (request(thinking={"type": "sometimes"}), "thinking.type"),
    (request(output_config={"effort": "extreme"}), "output_config.effort"),
    (request(tools=[{"name": "bad name!", "input_schema": {}}]), "tools[0].name"),
    (request(tools=[BASH], tool_choice={"type": "tool", "name": "Missing"}), "Missing"),
    (request(system=[{"type": "image"}]), "system[0].text"),
])
async def test_bad_input_is_a_400_in_anthropics_shape_naming_the_field(proxy, fake, body, fragment):
    response = await post(proxy, body)
    error = anthropic_error(await response.json())
    assert response.status == 400 and error["type"] == "invalid_request_error" and fragment in error["message"]
    assert fake.received == []


@pytest.mark.parametrize("case,status,kind", [
    ("unknown model", 404, "not_found_error"), ("body over the limit", 413, "request_too_large"),
    ("every token rate limited", 429, "rate_limit_error"), ("no usable token", 529, "overloaded_error"),
    ("upstream broken", 502, "api_error"), ("upstream silent", 504, "timeout_error"),
    ("unknown route", 404, "not_found_error")])
async def test_failures_have_anthropics_statuses_and_types(make_proxy, fake, tmp_path, case, status, kind):
    (tmp_path / "tokens.txt").write_text(make_jwt(time.time() + 3600) + "\n")
    proxy = await make_proxy(PROXY_MODE="user", MAX_REQUEST_MB="0.05", REQUEST_TIMEOUT="0.5", MAX_RETRIES=0)
    body, path = request(), "/v1/messages"
    if case == "unknown model":
        body = request(model="gpt-4")
    elif case == "body over the limit":
        body = request(messages=[{"role": "user", "content": "x" * 100_000}])
    elif case == "every token rate limited":
        fake.reply = Reply(status=429, headers={"Retry-After": "30"})
        await post(proxy, body)
    elif case == "no usable token":
        (tmp_path / "tokens.txt").write_text(make_jwt(time.time() - 60) + "\n")
        for _ in range(2):  # the change seen, then taken as it stayed
            await pool_of(proxy).reload()
    elif case == "upstream broken":
        fake.reply = Reply(status=500, body="boom")
    elif case == "upstream silent":
        fake.reply = Reply(first_delay=3)
    else:
        path = "/v1/messages/batches"
    response = await post(proxy, body, path)
    error = anthropic_error(await response.json())
    assert (response.status, error["type"]) == (status, kind)
    if status == 429:
        assert 1 <= int(response.headers["retry-after"]) <= 30


async def test_a_failure_after_the_stream_started_is_an_error_event(make_proxy, fake):
    proxy = await make_proxy(REQUEST_TIMEOUT="0.5")
    fake.reply = Reply(reasoning="x" * 200, piece=5, drop_after=8)
    events = await read_named_sse(await post(proxy, request(stream=True, thinking={"type": "adaptive"})))
    assert events[0][0] == "message_start" and events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "api_error" and "message_stop" not in [n for n, _ in events]


async def test_silence_gets_ping_events(make_proxy, fake):
    proxy = await make_proxy(KEEPALIVE_SECONDS="0.1")
    fake.reply = Reply(first_delay=0.5, answer=ANSWER)
    events = await read_named_sse(await post(proxy, request(stream=True)))
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names.count("ping") >= 3
    assert "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta") == ANSWER


# --- what today's clients send, through the anthropic SDK
FIXTURES = Path(__file__).parent / "fixtures"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "rank": {"type": "integer"}},
          "required": ["city", "rank"], "additionalProperties": False}
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

@WHOLE_OR_STREAMED
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


@WHOLE_OR_STREAMED
async def test_structured_output_on_the_api_goes_as_its_response_format(api_sdk, fake_api, stream):
    fake_api.reply = ApiReply(json_answer={"city": "Oslo", "rank": 2})
    message = await ask(api_sdk, stream, output_config={"format": {"type": "json_schema", "schema": SCHEMA}})
    assert json.loads(text_of(message)) == {"city": "Oslo", "rank": 2}
    sent = fake_api.received[-1].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"] == SCHEMA


@WHOLE_OR_STREAMED
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


@WHOLE_OR_STREAMED
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


@WHOLE_OR_STREAMED
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


async def test_an_anthropic_client_lists_the_models_in_anthropics_shape(sdk, proxy):
    client = await sdk()
    page = await client.models.list()
    ids = [model.id for model in page.data]
    assert ids[0] == MODEL and all(model.type == "model" for model in page.data)
    assert page.data[0].display_name == "K2 Horizon 375B A23B" and page.has_more is False
    assert page.first_id == ids[0] and page.last_id == ids[-1]
    assert any(model.display_name.endswith("(no thinking)") for model in page.data)
    one = await client.models.retrieve(MODEL)
    assert one.id == MODEL and one.display_name == "K2 Horizon 375B A23B" and one.created_at.year >= 2026
    second = await client.models.list(limit=1, after_id=ids[0])
    assert [model.id for model in second.data] == [ids[1]] and second.has_more is True
    openai_shape = await (await proxy.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})).json()
    assert openai_shape["object"] == "list" and openai_shape["data"][0]["object"] == "model"
