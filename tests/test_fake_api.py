"""The fake official IFM API (FakeIFM) over real HTTP: each rule of shared/ifm-api.md is enforced with the documented
error, and each answer variant a proxy must survive is produced on demand."""

import json
import urllib.error
import urllib.request

import aiohttp
import pytest
from conftest import MODEL, ROOT, free_port
from fake_api import MISSING_THINKING, THINKING_NOT_STRING, ApiReply, FakeIFM

REASONING = "The user greets me.\nI greet back."
ANSWER = "Hello — 你好! How can I help?"
LIMIT_HEADERS = ("x-ratelimit-limit-tokens-daily", "x-ratelimit-remaining-tokens-daily", "x-ratelimit-limit-tokens",
                 "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name in ("get_weather", "get_time")]


@pytest.fixture
async def api(fake_api):
    """A client session on the fake's base URL."""
    async with aiohttp.ClientSession(base_url=fake_api.url) as session:
        yield session


def body(*messages, **extra):
    return {"model": MODEL, "messages": list(messages) or [user("Hi")], **extra}


def user(content):
    return {"role": "user", "content": content}


def assistant(content="Hello!", **fields):
    return {"role": "assistant", "content": content, **fields}


def call(call_id, name="get_weather", arguments='{"city": "Abu Dhabi"}'):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool(call_id, content="31 C"):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


async def post(api, payload, key="k1", headers=None):
    auth = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return await api.post("/v1/chat/completions", json=payload, headers={**auth, **(headers or {})})


async def error_of(response, status, kind):
    """The error of an answer, checked to have the documented status, type and shape."""
    assert response.status == status
    error = (await response.json())["error"]
    assert set(error) == {"type", "code", "param", "message"} and error["type"] == kind
    return error


async def completed(api, payload, **options):
    response = await post(api, payload, **options)
    assert response.status == 200, await response.text()
    return await response.json()


def events_of(text):
    """The data payloads of an SSE body: JSON objects, and "[DONE]" as a string."""
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
            for line in text.split("\n") if line.startswith("data: ")]


async def streamed(api, payload, **options):
    """The events of a streamed answer and whether its body was cut (ended without the chunked terminator)."""
    response = await post(api, {**payload, "stream": True}, **options)
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    data, was_cut = b"", False
    try:
        while chunk := await response.content.readany():
            data += chunk
    except aiohttp.ClientPayloadError:
        was_cut = True
    return events_of(data.decode()), was_cut


def deltas(events, name):
    return "".join(e["choices"][0]["delta"].get(name) or "" for e in events if isinstance(e, dict) and e["choices"])


def finishes(events):
    return [e["choices"][0]["finish_reason"] for e in events if isinstance(e, dict) and e["choices"]
            and e["choices"][0]["finish_reason"]]


# --- models and keys

async def test_models_are_listed_in_the_openai_shape(api):
    response = await api.get("/v1/models", headers={"Authorization": "Bearer k1"})
    listing = await response.json()
    assert response.status == 200 and listing["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in listing["data"]] == [(MODEL, "model", "IFM")]


@pytest.mark.parametrize("key,status,kind", [("k1", 200, None), ("k3", 401, "authentication_error"),
                                             (None, 401, "authentication_error"), ("k2", 403, "permission_error")],
                         ids=["known", "unknown", "no-header", "refused"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models"])
async def test_keys_are_checked_on_every_route(api, fake_api, key, status, kind, path):
    fake_api.keys, fake_api.refused = {"k1", "k2"}, {"k2"}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if path == "/v1/models":
        response = await api.get(path, headers=headers)
    else:
        response = await api.post(path, json=body(), headers=headers)
    if kind:
        await error_of(response, status, kind)
    assert response.status == status and fake_api.received[-1].key == key


@pytest.mark.parametrize("key", ["anything", None])
async def test_without_keys_any_key_or_none_works(api, fake_api, key):
    """A vLLM started without --api-key."""
    assert fake_api.keys is None
    assert (await completed(api, body(), key=key))["choices"][0]["message"]["content"] == ApiReply().answer


@pytest.mark.parametrize("model,status,kind", [("IFM/K2-Think-V2", 410, "deprecated_model_error"),
                                               ("gpt-4o", 404, "not_found_error"),
                                               ("MBZUAI-IFM/K2-Think", 404, "not_found_error")])
async def test_only_k2_horizon_is_served(api, model, status, kind):
    error = await error_of(await post(api, {**body(), "model": model}), status, kind)
    assert error["param"] == "model"
    if status == 410:
        assert "migration" in error["message"].lower()


async def test_an_unknown_path_is_a_404_in_the_error_shape(api):
    await error_of(await api.post("/v1/completions", json={}), 404, "not_found_error")


# --- the request's rules

async def test_an_assistant_turn_without_a_thinking_field_is_a_400(api):
    error = await error_of(await post(api, body(user("Hi"), assistant(), user("And?"))), 400, "invalid_request_error")
    assert error["message"] == MISSING_THINKING == ("Assistant message is missing a thinking field. Provide one of: "
                                                    "think, reasoning, reasoning_content, think_fast, think_faster.")
    assert error["param"] == "messages[1]"


@pytest.mark.parametrize("role", ["system", "developer"])
async def test_a_system_message_after_the_first_is_a_400(api, role):
    error = await error_of(await post(api, body(user("Hi"), {"role": role, "content": "Be brief."})), 400,
                           "invalid_request_error")
    assert error["param"] == "messages[1].role" and "only first" in error["message"]


@pytest.mark.parametrize("name", ["reasoning_content", "reasoning"])
async def test_a_null_thinking_field_is_a_400(api, name):
    error = await error_of(await post(api, body(user("Hi"), assistant(**{name: None}), user("And?"))), 400,
                           "invalid_request_error")
    assert error["message"] == THINKING_NOT_STRING == "Assistant thinking fields must be strings"


@pytest.mark.parametrize("name", ["reasoning_content", "reasoning", "think", "think_fast", "think_faster"])
async def test_each_thinking_field_is_taken_and_empty_is_valid(api, fake_api, name):
    for reasoning in ("", "I thought."):
        await completed(api, body(user("Hi"), assistant(**{name: reasoning}), user("And?")))
        assert fake_api.received[-1].prompt[1]["reasoning"] == reasoning


@pytest.mark.parametrize("name,status", [("reasoning_content", 200), ("reasoning", 200), ("think", 400)])
async def test_through_vllm_only_reasoning_and_reasoning_content_survive(api, fake_api, name, status):
    fake_api.self_hosted = True
    response = await post(api, body(user("Hi"), assistant(**{name: "I thought."}), user("And?")))
    assert response.status == status
    if status == 400:
        assert (await error_of(response, 400, "invalid_request_error"))["message"] == MISSING_THINKING


async def test_text_parts_are_joined_into_one_string(api, fake_api):
    await completed(api, body(user([{"type": "text", "text": "first"}, {"type": "text", "text": "second"}])))
    assert fake_api.received[-1].prompt == [{"role": "user", "content": "first\nsecond"}]


@pytest.mark.parametrize("content", [
    [{"type": "text", "text": "What is this?"},
     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}],
    [{"type": "input_image", "image_url": "https://example.com/cat.png"}],
    [{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}],
    [{"type": "text"}],
    {"type": "text", "text": "a part, not a list"},
    42,
], ids=["image_url", "input_image", "audio", "text-without-text", "object", "number"])
async def test_content_other_than_a_string_or_text_parts_is_a_400(api, content):
    error = await error_of(await post(api, body(user(content))), 400, "invalid_request_error")
    assert error["param"].startswith("messages[0].content")


async def test_a_user_message_without_content_is_a_400(api):
    await error_of(await post(api, body({"role": "user"})), 400, "invalid_request_error")


async def test_blanking_server_answers_a_fluent_reply_to_an_empty_prompt(api, fake_api):
    """Self-hosted without --chat-template-content-format string: list content is blanked, and it still answers 200."""
    fake_api.blanking = True
    fake_api.reply = ApiReply(reasoning=REASONING, answer=ANSWER)
    answer = await completed(api, body(user([{"type": "text", "text": "Capital of France?"}])))
    assert fake_api.received[-1].prompt == [{"role": "user", "content": ""}]
    assert answer["choices"][0]["message"]["content"] not in ("", ANSWER)
    assert "empty" in answer["choices"][0]["message"]["content"]
    assert (await completed(api, body(user("Capital of France?"))))["choices"][0]["message"]["content"] == ANSWER


@pytest.mark.parametrize("messages,param", [
    ([user("Weather?"), assistant(None, reasoning_content="", tool_calls=[call("c1")])], "messages"),
    ([user("Weather?"), assistant(None, reasoning_content="", tool_calls=[call("c1")]), user("Well?")],
     "messages[2]"),
    ([user("Weather?"), assistant(None, reasoning_content="", tool_calls=[call("c1"), call("c2", "get_time")]),
      tool("c1"), user("Well?")], "messages[3]"),
    ([user("Weather?"), assistant(None, reasoning_content="", tool_calls=[call("c1")]), tool("c9")],
     "messages[2].tool_call_id"),
    ([user("Weather?"), tool("c1")], "messages[1].tool_call_id"),
    ([user("Weather?"), assistant(None, reasoning_content="", tool_calls=[call("c1")]), tool("c1"), tool("c1")],
     "messages[3].tool_call_id"),
    ([user("Weather?"), assistant(None, reasoning_content="", tool_calls=[call("c1")]), tool(None)],
     "messages[2].tool_call_id"),
], ids=["call-unanswered-at-the-end", "user-before-the-answer", "second-call-unanswered", "wrong-id",
        "tool-without-a-call", "answered-twice", "no-tool-call-id"])
async def test_every_tool_call_needs_its_own_tool_message(api, messages, param):
    error = await error_of(await post(api, body(*messages, tools=TOOLS)), 400, "invalid_request_error")
    assert error["param"] == param


async def test_several_tool_calls_each_answered_are_taken(api, fake_api):
    await completed(api, body(user("Weather and time?"),
                              assistant(None, reasoning_content="Two tools.", tool_calls=[call("c1"),
                                                                                          call("c2", "get_time")]),
                              tool("c2", "12:00"), tool("c1"), tools=TOOLS))
    assert [m["role"] for m in fake_api.received[-1].prompt] == ["user", "assistant", "tool", "tool"]


@pytest.mark.parametrize("bad", [call("c1", arguments={"city": "Abu Dhabi"}),
                                 {"id": "c1", "function": {"name": "get_weather", "arguments": "{}"}},
                                 {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
                         ids=["arguments-object", "no-type", "no-id"])
async def test_a_replayed_tool_call_keeps_the_openai_wire_shape(api, bad):
    messages = [user("Weather?"), assistant(None, reasoning_content="", tool_calls=[bad]), tool("c1")]
    await error_of(await post(api, body(*messages, tools=TOOLS)), 400, "invalid_request_error")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_a_tool_choice_needs_the_tools_it_names(api, tool_choice):
    await error_of(await post(api, body(tool_choice=tool_choice)), 400, "invalid_request_error")
    await completed(api, body(tool_choice=tool_choice, tools=TOOLS))


@pytest.mark.parametrize("effort", ["minimal", "none", "xhigh", "max", None, 3])
async def test_an_unsupported_reasoning_effort_is_a_400(api, fake_api, effort):
    error = await error_of(await post(api, body(chat_template_kwargs={"reasoning_effort": effort})), 400,
                           "invalid_request_error")
    assert error["message"].startswith("Unsupported reasoning_effort")
    assert error["param"] == "chat_template_kwargs.reasoning_effort"
    assert fake_api.received[-1].effort_places == ["chat_template_kwargs"]


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
async def test_the_template_reads_the_effort_from_chat_template_kwargs(api, fake_api, effort):
    await completed(api, body(chat_template_kwargs={"reasoning_effort": effort}))
    assert fake_api.received[-1].effort == effort and fake_api.received[-1].effort_places == ["chat_template_kwargs"]


@pytest.mark.parametrize("payload,places,extra_body", [
    ({"reasoning_effort": "low"}, ["reasoning_effort"], False),
    ({"reasoning_effort": "xhigh"}, ["reasoning_effort"], False),
    ({"extra_body": {"chat_template_kwargs": {"reasoning_effort": "low"}}}, ["extra_body"], True),
    ({"extra_body": {"reasoning_effort": "low"}}, ["extra_body"], True),
    ({"reasoning_effort": "low", "chat_template_kwargs": {"reasoning_effort": "medium"}},
     ["chat_template_kwargs", "reasoning_effort"], False),
    ({}, [], False),
], ids=["top-level", "top-level-foreign-value", "extra-body-kwargs", "extra-body", "both", "none"])
async def test_where_the_effort_was_sent_is_recorded_and_only_the_kwargs_count(api, fake_api, payload, places,
                                                                               extra_body):
    await completed(api, body(**payload))
    record = fake_api.received[-1]
    assert record.effort_places == places and record.extra_body is extra_body
    assert record.effort == payload.get("chat_template_kwargs", {}).get("reasoning_effort", "high")


async def test_tool_formats_and_the_session_header_are_recorded(api, fake_api):
    await completed(api, body(tools=TOOLS, tool_presentation_format="xml", tool_call_format="xml"),
                    headers={"X-Session-ID": "run-8f2c"})
    await completed(api, body())
    first, second = fake_api.received[-2:]
    assert first.tool_formats == {"tool_presentation_format": "xml", "tool_call_format": "xml"}
    assert first.session_id == "run-8f2c" and first.key == "k1" and first.body["tools"] == TOOLS
    assert second.tool_formats == {} and second.session_id is None


@pytest.mark.parametrize("stop,status", [("END", 200), (["a", "b", "c", "d"], 200), (["a", "b", "c", "d", "e"], 400),
                                         ([1], 400)])
async def test_stop_takes_at_most_four_strings(api, stop, status):
    response = await post(api, body(stop=stop))
    assert response.status == status
    if status == 400:
        assert (await error_of(response, 400, "invalid_request_error"))["param"] == "stop"


async def test_stream_options_need_a_stream(api):
    await error_of(await post(api, body(stream_options={"include_usage": True})), 400, "invalid_request_error")


@pytest.mark.parametrize("response_format", [{"type": "json_schema", "json_schema": {"schema": {}}},
                                             {"type": "json_schema"}, {"type": "yaml"}])
async def test_a_malformed_response_format_is_a_400(api, response_format):
    error = await error_of(await post(api, body(response_format=response_format)), 400, "invalid_request_error")
    assert error["param"].startswith("response_format")


async def test_a_prompt_beyond_the_context_is_a_422(api, fake_api):
    fake_api.context = 100
    error = await error_of(await post(api, body(user("x" * 600))), 422, "validation_error")
    assert error["code"] == "context_length_exceeded"
    await error_of(await post(api, body(max_tokens=200)), 422, "validation_error")
    await completed(api, body(max_tokens=20))


async def test_a_body_beyond_the_limit_is_a_413(api, fake_api):
    fake_api.max_body = 1000
    await error_of(await post(api, body(user("x" * 2000))), 413, "request_too_large")


async def test_a_body_that_is_not_json_is_a_400(api):
    response = await api.post("/v1/chat/completions", data=b"{not json", headers={"Authorization": "Bearer k1"})
    await error_of(response, 400, "invalid_request_error")


# --- answers

async def test_a_non_streamed_answer_has_the_documented_shape(api, fake_api):
    fake_api.reply = ApiReply(reasoning=REASONING, answer=ANSWER)
    answer = await completed(api, body())
    choice = answer["choices"][0]
    assert answer["model"] == MODEL and answer["id"].startswith("chatcmpl-")
    assert choice["message"] == {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING,
                                 "reasoning": REASONING, "tool_calls": []}
    assert choice["finish_reason"] == "stop"
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]
    assert fake_api.received[-1].usage == usage and fake_api.received[-1].status == 200


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_stream_sends_reasoning_then_content_then_finish_usage_and_done(api, fake_api, include_usage):
    fake_api.reply = ApiReply(reasoning=REASONING, answer=ANSWER, piece=5)
    events, was_cut = await streamed(api, body(stream_options={"include_usage": include_usage}))
    assert not was_cut and events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    reasoning = [c["choices"][0]["delta"] for c in chunks if "reasoning_content" in c["choices"][0]["delta"]]
    assert all(d["reasoning"] == d["reasoning_content"] for d in reasoning) and len(reasoning) > 1
    kinds = ["r" if "reasoning_content" in c["choices"][0]["delta"] else "c" for c in chunks[1:]]
    assert kinds == sorted(kinds, reverse=True)  # every reasoning delta comes before any content delta
    assert deltas(chunks, "reasoning_content") == REASONING and deltas(chunks, "content") == ANSWER
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["delta"]["content"]
    assert finishes(events) == ["stop"]
    usage = [e for e in events[:-1] if not e["choices"]]
    assert [set(e) >= {"usage"} for e in usage] == ([True] if include_usage else [])
    if include_usage:
        assert usage[0]["usage"] == fake_api.received[-1].usage


async def test_tool_calls_stream_in_argument_fragments_and_end_with_tool_calls(api, fake_api):
    fake_api.reply = ApiReply(reasoning="Two tools.", answer="", piece=4, tool_calls=[
        {"name": "get_weather", "arguments": {"city": "Abu Dhabi"}}, {"name": "get_time", "arguments": {"tz": "GST"}}])
    events, _ = await streamed(api, body(tools=TOOLS, tool_choice="auto"))
    fragments = [tc for e in events[:-1] for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    by_index = {}
    for fragment in fragments:
        by_index.setdefault(fragment["index"], []).append(fragment)
    assert sorted(by_index) == [0, 1] and all(len(parts) > 2 for parts in by_index.values())
    assert [parts[0]["function"]["name"] for parts in by_index.values()] == ["get_weather", "get_time"]
    assert all(parts[0]["id"].startswith("call_") and parts[0]["type"] == "function" for parts in by_index.values())
    arguments = [json.loads("".join(p["function"]["arguments"] for p in parts)) for parts in by_index.values()]
    assert arguments == [{"city": "Abu Dhabi"}, {"tz": "GST"}]
    assert finishes(events) == ["tool_calls"] and "tool_calls" in events[-2]["choices"][0]["delta"]


async def test_a_non_streamed_answer_with_tool_calls(api, fake_api):
    fake_api.reply = ApiReply(answer="", tool_calls=[{"name": "get_weather", "arguments": {"city": "Doha"}},
                                                     {"name": "get_time", "arguments": {}, "id": "call_fixed"}])
    choice = (await completed(api, body(tools=TOOLS)))["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Doha"}), ("function", "get_time", {})]
    assert calls[1]["id"] == "call_fixed"


@pytest.mark.parametrize("extra", [{}, {"tools": TOOLS, "tool_choice": "none"},
                                   {"tools": TOOLS, "tool_choice": {"type": "function",
                                                                    "function": {"name": "get_time"}}}],
                         ids=["no-tools", "tool-choice-none", "other-function-named"])
async def test_the_model_calls_only_functions_the_request_offers(api, fake_api, extra):
    fake_api.reply = ApiReply(answer="I cannot look that up.", tool_calls=[{"name": "get_weather", "arguments": {}}])
    choice = (await completed(api, body(**extra)))["choices"][0]
    assert choice["message"]["tool_calls"] == [] and choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "I cannot look that up."


CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, {"type": "json_schema", "json_schema": {
    "name": "city", "strict": True, "schema": CITY_SCHEMA}}], ids=["json_object", "json_schema"])
@pytest.mark.parametrize("stream", [False, True])
async def test_structured_output_is_the_steered_json_in_content_only(api, fake_api, response_format, stream):
    fake_api.reply = ApiReply(reasoning="Paris is the capital.", answer="Paris", json_answer={"city": "Paris"})
    if stream:
        events, _ = await streamed(api, body(response_format=response_format))
        content, reasoning = deltas(events, "content"), deltas(events, "reasoning_content")
    else:
        message = (await completed(api, body(response_format=response_format)))["choices"][0]["message"]
        content, reasoning = message["content"], message["reasoning_content"]
    assert json.loads(content) == {"city": "Paris"} and reasoning == "Paris is the capital."
    text = (await completed(api, body(response_format={"type": "text"})))["choices"][0]["message"]["content"]
    assert text == "Paris"


async def test_max_tokens_cuts_the_answer_with_finish_length(api, fake_api):
    fake_api.reply = ApiReply(reasoning="r" * 40, answer="a" * 40)
    choice = (await completed(api, body(max_tokens=12)))["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "a" * 8
    choice = (await completed(api, body(max_tokens=5)))["choices"][0]
    assert choice["message"]["content"] == "" and choice["message"]["reasoning_content"] == "r" * 20


async def test_a_session_replayed_verbatim_is_served_from_cache(api, fake_api):
    fake_api.reply = ApiReply(reasoning=REASONING, answer=ANSWER)
    session = {"X-Session-ID": "d1c4e8a0"}
    first = (await completed(api, body(), headers=session))["usage"]
    follow_up = body(user("Hi"), assistant(ANSWER, reasoning_content=REASONING), user("More?"))
    again = (await completed(api, follow_up, headers=session))["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["prompt_tokens_details"]["cached_tokens"] > first["prompt_tokens"]
    assert (await completed(api, follow_up))["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    lossy = body(user("Hi"), assistant(ANSWER, reasoning_content=""), user("More?"))
    cached = (await completed(api, lossy, headers=session))["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached < again["prompt_tokens_details"]["cached_tokens"]  # replayed reasoning lost: the cache diverges


async def test_replies_are_steered_per_key_and_by_script(api, fake_api):
    fake_api.by_key["k2"] = ApiReply(answer="for k2")
    fake_api.script = [ApiReply(answer="first"), ApiReply(answer="second")]
    answers = [(await completed(api, body(), key=key))["choices"][0]["message"]["content"]
               for key in ("k1", "k2", "k1", "k2")]
    assert answers == ["first", "second", ApiReply().answer, "for k2"]


async def test_a_refused_request_does_not_use_up_the_script(api, fake_api):
    fake_api.script = [ApiReply(answer="scripted")]
    await error_of(await post(api, body(stop=list("abcde"))), 400, "invalid_request_error")
    assert (await completed(api, body()))["choices"][0]["message"]["content"] == "scripted"


# --- limits and failures

@pytest.mark.parametrize("make", [lambda api: post(api, body()), lambda api: post(api, body(stop=list("abcde"))),
                                  lambda api: api.get("/v1/models", headers={"Authorization": "Bearer k1"})],
                         ids=["answer", "error", "models"])
async def test_every_answer_carries_the_rate_limit_headers(api, make):
    response = await make(api)
    assert all(name in response.headers for name in LIMIT_HEADERS)
    assert response.headers["x-ratelimit-limit-tokens-daily"] == "10000000"


async def test_answers_count_down_the_daily_budget(api, fake_api):
    usage = (await completed(api, body()))["usage"]
    response = await post(api, body())
    second = (await response.json())["usage"]["total_tokens"]
    remaining = int(response.headers["x-ratelimit-remaining-tokens-daily"])
    assert remaining == 10_000_000 - usage["total_tokens"] - second
    assert fake_api.daily_used == {"k1": usage["total_tokens"] + second}


async def test_a_spent_daily_budget_is_a_429_until_midnight_utc(api, fake_api):
    now = 1_790_000_000.0  # 2026-09-22 14:13:20 UTC
    fake_api.clock = lambda: now
    fake_api.daily_budget = 100
    await completed(api, body(user("x" * 500)))  # over the cap with this answer: the next one is refused
    response = await post(api, body())
    error = await error_of(response, 429, "rate_limit_error")
    assert "daily" in error["code"] and response.headers["Retry-After"] == str(86400 - int(now) % 86400)
    assert response.headers["x-ratelimit-remaining-tokens-daily"] == "0"
    await completed(api, body(), key="other-key")  # the budget is per key
    now += 86400 - now % 86400  # 00:00 UTC
    await completed(api, body())


async def test_the_per_minute_guard_refuses_until_its_window_refills(api, fake_api):
    now = 1_790_000_000.0
    fake_api.clock = lambda: now
    fake_api.minute_budget = 50
    await completed(api, body(user("x" * 300)))
    now += 20
    response = await post(api, body())
    error = await error_of(response, 429, "rate_limit_error")
    assert error["code"] == "token_rate_limit" and error["message"] == "Per-minute token budget exhausted."
    assert response.headers["Retry-After"] == "40" and response.headers["x-ratelimit-remaining-tokens"] == "0"
    now += 40
    await completed(api, body())


async def test_a_steered_minute_guard_429(api, fake_api):
    fake_api.reply = ApiReply(status=429, retry_after=12)
    response = await post(api, body())
    error = await error_of(response, 429, "rate_limit_error")
    assert (error["code"], error["message"]) == ("token_rate_limit", "Per-minute token budget exhausted.")
    assert response.headers["Retry-After"] == "12" and fake_api.received[-1].status == 429


@pytest.mark.parametrize("status,kind", [(408, "timeout_error"), (500, "api_error"), (502, "upstream_error"),
                                         (503, "service_unavailable"), (504, "upstream_error"),
                                         (529, "overloaded_error")])
async def test_steered_server_errors_have_their_documented_type(api, fake_api, status, kind):
    fake_api.reply = ApiReply(status=status)
    await error_of(await post(api, body()), status, kind)
    assert fake_api.daily_used == {}  # an error bills nothing


@pytest.mark.parametrize("reasoning", [REASONING, ""], ids=["only-reasoning", "nothing"])
async def test_a_stream_truncated_before_any_content(api, fake_api, reasoning):
    fake_api.reply = ApiReply(reasoning=reasoning, answer=ANSWER, truncate="before_content")
    events, was_cut = await streamed(api, body(stream_options={"include_usage": True}))
    assert was_cut and "[DONE]" not in events and finishes(events) == []
    assert deltas(events, "reasoning_content") == reasoning and deltas(events, "content") == ""
    assert all(e["choices"] for e in events)  # no usage chunk either


async def test_a_stream_truncated_after_some_content(api, fake_api):
    fake_api.reply = ApiReply(reasoning=REASONING, answer=ANSWER, piece=4, truncate="mid_content")
    events, was_cut = await streamed(api, body())
    assert was_cut and "[DONE]" not in events and finishes(events) == []
    content = deltas(events, "content")
    assert content and ANSWER.startswith(content) and content != ANSWER


async def test_a_non_streamed_answer_truncated_is_a_dropped_connection(api, fake_api):
    fake_api.reply = ApiReply(truncate="mid_content")
    with pytest.raises(aiohttp.ClientError):
        await (await post(api, body())).read()


# --- the effort closers: a follow-up at low or medium effort filed whole under reasoning

FOLLOW_UP = [user("Hi"), assistant("Hello!", reasoning_content="Greeting."), user("What is 2+2?")]


@pytest.mark.parametrize("effort", ["low", "medium"])
@pytest.mark.parametrize("closer", ["<ifm|think>", "</ifm|think>"])
async def test_a_low_or_medium_follow_up_comes_back_as_reasoning_only(api, fake_api, effort, closer):
    fake_api.empty_followups = True
    fake_api.reply = ApiReply(reasoning="Two plus two.", answer="It is 4.", closer=closer)
    payload = body(*FOLLOW_UP, chat_template_kwargs={"reasoning_effort": effort})
    message = (await completed(api, payload))["choices"][0]["message"]
    assert message["content"] == "" and message["reasoning_content"] == message["reasoning"]
    thought, _, after = message["reasoning_content"].partition(closer)
    assert thought == "Two plus two." and after.strip() == "It is 4."
    events, _ = await streamed(api, payload)
    assert deltas(events, "content") == "" and closer in deltas(events, "reasoning") and finishes(events) == ["stop"]


@pytest.mark.parametrize("messages,effort", [(FOLLOW_UP, "high"), (FOLLOW_UP, None), ([user("Hi")], "low")],
                         ids=["high-effort", "default-effort", "first-turn"])
async def test_a_high_effort_or_first_turn_answers_normally(api, fake_api, messages, effort):
    fake_api.empty_followups = True
    kwargs = {"chat_template_kwargs": {"reasoning_effort": effort}} if effort else {}
    assert (await completed(api, body(*messages, **kwargs)))["choices"][0]["message"]["content"] == ApiReply().answer


@pytest.mark.parametrize("self_hosted,steered,empty", [(False, None, False), (True, None, True),
                                                       (False, True, True), (True, False, False)],
                         ids=["hosted-default", "self-hosted-default", "steered-on", "steered-off"])
async def test_the_empty_follow_up_is_on_for_self_hosted_and_steerable_per_reply(aiohttp_server, self_hosted,
                                                                                  steered, empty):
    fake = FakeIFM(self_hosted=self_hosted)
    fake.reply = ApiReply(empty_followup=steered)
    server = await aiohttp_server(fake.app)
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as api:
        answer = await completed(api, body(*FOLLOW_UP, chat_template_kwargs={"reasoning_effort": "low"}))
    assert (answer["choices"][0]["message"]["content"] == "") is empty


# --- self-hosted (vLLM/SGLang)

async def test_a_self_hosted_server_has_no_rate_limits_and_one_model(api, fake_api):
    fake_api.self_hosted = True
    fake_api.daily_budget = 1
    response = await post(api, body(), key=None)
    assert response.status == 200 and not any(name in response.headers for name in LIMIT_HEADERS)
    await completed(api, body())
    await error_of(await post(api, {**body(), "model": "IFM/K2-Think-V2"}), 404, "not_found_error")
    no_model = body()
    del no_model["model"]
    assert (await completed(api, no_model))["model"] == MODEL


# --- the process form

def fake_call(port, path, payload=None, key=None):
    """A request to the fake process: its status and JSON body."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST" if payload is not None else "GET",
                                     data=json.dumps(payload).encode() if payload is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_the_process_form_starts_answers_and_is_steered(spawn):
    port = free_port()
    spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(port), "--api", "--keys", "k1,k2",
           "--refused", "k2"], port)
    assert fake_call(port, "/v1/models", key="k1")[1]["data"][0]["id"] == MODEL
    assert fake_call(port, "/v1/models", key="k3")[0] == 401
    assert fake_call(port, "/v1/models", key="k2")[0] == 403
    fake_call(port, "/_fake/reply", {"reasoning": "Steered.", "answer": "From the process."})
    status, answer = fake_call(port, "/v1/chat/completions", body(), key="k1")
    assert status == 200 and answer["choices"][0]["message"]["content"] == "From the process."
    fake_call(port, "/_fake/reply", {"key": "k1", "answer": "For k1."})
    fake_call(port, "/_fake/reply", {"script": [{"status": 529}]})
    assert fake_call(port, "/v1/chat/completions", body(), key="k1")[1]["error"]["type"] == "overloaded_error"
    assert fake_call(port, "/v1/chat/completions", body(), key="k1")[1]["choices"][0]["message"]["content"] == "For k1."
    assert fake_call(port, "/_fake/config", {"keys": None, "daily_budget": 5})[1]["daily_budget"] == 5
    fake_call(port, "/v1/chat/completions", body(), key="anyone")
    status, error = fake_call(port, "/v1/chat/completions", body(), key="anyone")
    assert status == 429 and "daily" in error["error"]["code"]
    received = fake_call(port, "/_fake/received")[1]
    assert [r["status"] for r in received] == [200, 401, 403, 200, 529, 200, 200, 429]
    assert received[3]["key"] == "k1" and received[3]["body"]["messages"] == body()["messages"]
    assert received[3]["effort"] == "high" and received[3]["usage"]["total_tokens"] > 0
    fake_call(port, "/_fake/reset", {})
    assert fake_call(port, "/_fake/received")[1] == []
    assert fake_call(port, "/v1/chat/completions", body(), key="anyone")[0] == 200


def test_the_process_form_takes_the_self_hosted_flags(spawn):
    port = free_port()
    spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(port), "--api", "--self-hosted", "--blanking"],
          port)
    settings = fake_call(port, "/_fake/config")[1]
    assert settings["self_hosted"] and settings["blanking"] and settings["empty_followups"] and settings["keys"] is None
    status, answer = fake_call(port, "/v1/chat/completions", body(user([{"type": "text", "text": "Hi"}])))
    assert status == 200 and "empty" in answer["choices"][0]["message"]["content"]
