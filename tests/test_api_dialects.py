"""Each client dialect (chat completions, Anthropic Messages, Responses), whole and streamed, through the official
openai and anthropic SDKs to a proxy whose upstream is the fake IFM API (UPSTREAM=api): what reaches upstream, and
what comes back to the client in its own dialect's form; and, over raw HTTP, answers a careless reader breaks on."""

import asyncio
import json
import re
from dataclasses import dataclass, field

import anthropic
import openai
import pytest
from aiohttp import web
from conftest import (
    API_KEY,
    AUTH,
    CHAT,
    DEEP,
    DIALECTS,
    EACH_DIALECT,
    IMAGE_PARTS,
    MESSAGES,
    MODEL,
    NO_REASONING_SHOWN,
    RESPONSES,
    TEXT_PARTS,
    WHOLE_OR_STREAMED,
    asked,
    stream_ended_well,
    stream_text_of,
)
from fake_api import ApiReply
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

import k2proxy

OTHER_KEY = "sk-second-client-key"
IFM_KEY = "IFM-dialects-test-key"
REASONING = "The user greets me.\nI greet back — 你好."
ANSWER = "Hello! How can I help you today?"
TOOL_FORMATS = {"tool_presentation_format": "xml", "tool_call_format": "xml"}
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"]}
WEATHER_CALL = {"city": "Abu Dhabi", "unit": "celsius", "note": "a longer argument, so that it comes in pieces"}
UPSTREAM_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                                  "parameters": CITY}}
TOOLS = {"chat": [UPSTREAM_TOOL],
         "anthropic": [{"name": "get_weather", "description": "Weather for a city.", "input_schema": CITY}],
         "responses": [{"type": "function", "name": "get_weather", "description": "Weather for a city.",
                        "parameters": CITY}]}


class Weather(BaseModel):
    city: str
    celsius: int


@dataclass
class Said:
    """One answer as the client got it, in no dialect, so that one test body serves all three."""
    text: str
    reasoning: str
    calls: list
    form: list
    counts: dict
    turn: list = field(default_factory=list)
    dropped: list = field(default_factory=list)  # the same turn as a client that keeps only the answer sends it


def leave_out_none(options):
    return {name: value for name, value in options.items() if value is not None}


class ChatDialect:
    """Chat completions through AsyncOpenAI; a stream is joined delta by delta, as plain clients do."""

    def __init__(self, url, stream, key):
        self.sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)
        self.stream = stream

    @staticmethod
    def user(content):
        return {"role": "user", "content": content}

    @staticmethod
    def invented(text):
        return [{"role": "assistant", "content": text}]

    @staticmethod
    def results(said, output):
        return [{"role": "tool", "tool_call_id": call_id, "content": output} for call_id, _, _ in said.calls]

    async def ask(self, history, **options):
        options = leave_out_none({"model": MODEL, "messages": history, **options})
        if not self.stream:
            completion = await self.sdk.chat.completions.create(**options)
            message = completion.choices[0].message
            reasoning = getattr(message, "reasoning_content", None) or ""
            calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()]
            return self.said(message.content or "", reasoning, calls, completion.usage)
        chunks = await self.sdk.chat.completions.create(**options, stream=True, stream_options={"include_usage": True})
        text, reasoning, calls, usage = [], [], {}, None
        async for chunk in chunks:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
                for piece in choice.delta.tool_calls or ():
                    call = calls.setdefault(piece.index, [None, "", []])
                    call[0] = piece.id or call[0]
                    call[1] = (piece.function.name if piece.function else None) or call[1]
                    call[2].append((piece.function.arguments if piece.function else None) or "")
        joined = [(call_id, name, "".join(pieces)) for call_id, name, pieces in calls.values()]
        return self.said("".join(text), "".join(reasoning), joined, usage)

    @staticmethod
    def said(text, reasoning, calls, usage):
        form = [name for name, given in (("reasoning_content", reasoning), ("content", text), ("tool_calls", calls))
                if given]
        wire_calls = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
                      for call_id, name, arguments in calls]
        dropped = {"role": "assistant", "content": text or None, **({"tool_calls": wire_calls} if calls else {})}
        details = lambda name: getattr(usage, name, None)
        counts = {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens,
                  "reasoning": getattr(details("completion_tokens_details"), "reasoning_tokens", None),
                  "cached": getattr(details("prompt_tokens_details"), "cached_tokens", None)}
        return Said(text, reasoning, [(i, n, json.loads(a)) for i, n, a in calls], form, counts,
                    [{**dropped, "reasoning_content": reasoning}], [dropped])

    @staticmethod
    def tool_choice(name):
        return {"type": "function", "function": {"name": name}}


class AnthropicDialect:
    """Anthropic Messages through AsyncAnthropic; a stream is read by the SDK's own accumulator, as clients do."""

    def __init__(self, url, stream, key):
        self.sdk = anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0, timeout=10)
        self.stream = stream

    @staticmethod
    def user(content):
        return {"role": "user", "content": content}

    @staticmethod
    def invented(text):
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    @staticmethod
    def results(said, output):
        return [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": output}
                                             for call_id, _, _ in said.calls]}]

    async def ask(self, history, **options):
        options = leave_out_none({"model": MODEL, "max_tokens": 4096, "messages": history,
                                  "thinking": {"type": "enabled", "budget_tokens": 16000}, **options})
        if self.stream:
            async with self.sdk.messages.stream(**options) as stream:
                message = await stream.get_final_message()
        else:
            message = await self.sdk.messages.create(**options)
        blocks = [block.model_dump(exclude_none=True) for block in message.content]
        usage = message.usage
        cached = usage.cache_read_input_tokens  # Anthropic counts cache reads apart from input_tokens
        counts = {"prompt": usage.input_tokens + (cached or 0), "completion": usage.output_tokens,
                  "reasoning": getattr(usage.output_tokens_details, "thinking_tokens", None), "cached": cached}
        return Said("".join(b["text"] for b in blocks if b["type"] == "text"),
                    "".join(b["thinking"] for b in blocks if b["type"] == "thinking"),
                    [(b["id"], b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"],
                    [b["type"] for b in blocks], counts, [{"role": "assistant", "content": blocks}],
                    [{"role": "assistant", "content": [b for b in blocks if b["type"] != "thinking"]}])

    @staticmethod
    def tool_choice(name):
        return {"type": "tool", "name": name}


class ResponsesDialect:
    """Responses through AsyncOpenAI, summary asked; a stream is read by the SDK's own accumulator, as clients do."""

    def __init__(self, url, stream, key):
        self.sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)
        self.stream = stream
        self.last = None

    @staticmethod
    def user(content):
        return {"role": "user", "content": content}

    @staticmethod
    def invented(text):
        return [{"role": "assistant", "content": text}]

    @staticmethod
    def results(said, output):
        return [{"type": "function_call_output", "call_id": call_id, "output": output}
                for call_id, _, _ in said.calls]

    async def ask(self, history, **options):
        options = leave_out_none({"model": MODEL, "input": history, "reasoning": {"summary": "auto"}, **options})
        if self.stream:
            async with self.sdk.responses.stream(**options) as stream:
                response = await stream.get_final_response()
        else:
            response = await self.sdk.responses.create(**options)
        self.last = response
        items = [item.model_dump(exclude_none=True) for item in response.output]
        usage = response.usage
        counts = {"prompt": usage.input_tokens, "completion": usage.output_tokens,
                  "reasoning": usage.output_tokens_details.reasoning_tokens,
                  "cached": usage.input_tokens_details.cached_tokens}
        return Said(response.output_text,
                    "".join(part["text"] for item in items if item["type"] == "reasoning" for part in item["summary"]),
                    [(item["call_id"], item["name"], json.loads(item["arguments"]))
                     for item in items if item["type"] == "function_call"],
                    [item["type"] for item in items], counts, items,
                    [item for item in items if item["type"] != "reasoning"])

    @staticmethod
    def tool_choice(name):
        return {"type": "function", "name": name}


CLIENTS = {"chat": ChatDialect, "anthropic": AnthropicDialect, "responses": ResponsesDialect}


@pytest.fixture
async def connect(api_proxy, fake_api):
    """(dialect, stream, client key) → a client on a proxy in front of the fake API, with two client keys; the fake
    answers REASONING and ANSWER unless steered."""
    fake_api.reply = ApiReply(reasoning=REASONING, answer=ANSWER)
    proxy = await api_proxy(key=IFM_KEY, VALID_API_KEY=f"{API_KEY},{OTHER_KEY}")
    url, made = str(proxy.make_url("")).rstrip("/"), []

    def start(kind, stream, key=API_KEY):
        made.append(CLIENTS[kind](url, stream, key))
        return made[-1]

    yield start
    for client in made:
        await client.sdk.close()


def upstream_messages(fake_api, index=-1):
    return fake_api.received[index].body["messages"]


def assistant_reasoning(fake_api, index=-1):
    """The reasoning_content of each assistant turn of a request upstream received."""
    return [m["reasoning_content"] for m in upstream_messages(fake_api, index) if m["role"] == "assistant"]


def upstream_counts(record):
    usage = record.usage
    return {"prompt": usage["prompt_tokens"], "completion": usage["completion_tokens"],
            "reasoning": usage["completion_tokens_details"]["reasoning_tokens"],
            "cached": usage["prompt_tokens_details"]["cached_tokens"]}


async def two_turns(client, history_of_second):
    """Asks "Hi", then a follow-up whose history `history_of_second(first answer)` builds."""
    opening = [client.user("Hi")]
    first = await client.ask(opening)
    second = await client.ask(opening + history_of_second(first) + [client.user("And how are you?")])
    return first, second


# ─── 1. a plain turn

FORMS = {"chat": ["reasoning_content", "content"], "anthropic": ["thinking", "text"],
         "responses": ["reasoning", "message"]}


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_the_answer_and_its_reasoning_come_in_the_dialects_form(connect, fake_api, kind, stream):
    client = connect(kind, stream)
    said = await client.ask([client.user("Hi")])
    assert (said.text, said.reasoning, said.form) == (ANSWER, REASONING, FORMS[kind])
    assert [record.status for record in fake_api.received] == [200]


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_usage_carries_upstreams_counts_with_reasoning_and_cached_tokens(connect, fake_api, kind, stream):
    """A verbatim replay under the same session is partly served from upstream's cache, and the client sees it."""
    first, second = await two_turns(connect(kind, stream), lambda said: said.turn)
    assert [upstream_counts(record)["cached"] > 0 for record in fake_api.received] == [False, True]
    assert [first.counts, second.counts] == [upstream_counts(record) for record in fake_api.received]


# ─── 2. multi-turn: the reasoning of earlier assistant turns

@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_reasoning_the_client_replays_reaches_upstream_verbatim(connect, fake_api, kind, stream):
    fake_api.script = [ApiReply(reasoning=REASONING, answer=ANSWER), ApiReply(reasoning="Fine.", answer="Good.")]
    client = connect(kind, stream)
    _, second = await two_turns(client, lambda said: said.turn)
    assert second.text == "Good."
    assert assistant_reasoning(fake_api) == [REASONING]
    assert [record.status for record in fake_api.received] == [200, 200]


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_reasoning_the_client_dropped_is_sent_from_the_proxys_own_earlier_answer(connect, fake_api, kind,
                                                                                        stream):
    """Plain clients keep only the answer; the API wants the reasoning back verbatim, and the proxy kept it."""
    client = connect(kind, stream)
    _, second = await two_turns(client, lambda said: said.dropped)
    assert second.text == ANSWER
    assert assistant_reasoning(fake_api) == [REASONING]
    assert [record.status for record in fake_api.received] == [200, 200]


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_an_assistant_turn_the_proxy_never_wrote_goes_with_empty_reasoning(connect, fake_api, kind, stream):
    client = connect(kind, stream)
    history = [client.user("Hi"), *client.invented("Greetings, written by some other model."),
               client.user("And how are you?")]
    said = await client.ask(history)
    assert said.text == ANSWER
    assert upstream_messages(fake_api)[1] == {"role": "assistant", "content": "Greetings, written by some other model.",
                                              "reasoning_content": ""}


@EACH_DIALECT
async def test_another_client_key_does_not_get_this_keys_reasoning(connect, fake_api, kind):
    """The replay cache is per client key: the same answer sent back under another key is a turn it never saw."""
    mine = connect(kind, False)
    first = await mine.ask([mine.user("Hi")])
    theirs = connect(kind, False, OTHER_KEY)
    await theirs.ask([theirs.user("Hi"), *first.dropped, theirs.user("And how are you?")])
    assert assistant_reasoning(fake_api) == [""]


@WHOLE_OR_STREAMED
@pytest.mark.parametrize("summary", [{"summary": "auto"}, None], ids=["summary", "no-summary"])
async def test_previous_response_id_carries_the_reasoning_upstream(connect, fake_api, stream, summary):
    """With a summary the stored reasoning item goes back; without one, the proxy's own record of the turn."""
    client = connect("responses", stream)
    await client.ask("Hi", reasoning=summary)
    said = await client.ask("And how are you?", previous_response_id=client.last.id, reasoning=summary)
    assert said.text == ANSWER
    assert assistant_reasoning(fake_api) == [REASONING]
    assert [m["role"] for m in upstream_messages(fake_api)] == ["user", "assistant", "user"]


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_one_conversation_has_one_session_id_another_conversation_or_key_its_own(connect, fake_api, kind,
                                                                                       stream):
    await two_turns(connect(kind, stream), lambda said: said.dropped)
    other_conversation = connect(kind, stream)
    await other_conversation.ask([other_conversation.user("Something else entirely")])
    await two_turns(connect(kind, stream, OTHER_KEY), lambda said: said.dropped)
    sessions = [record.session_id for record in fake_api.received]
    assert all(re.fullmatch(r"[0-9a-f]{32}", session) for session in sessions)
    assert sessions[0] == sessions[1] and sessions[3] == sessions[4]
    assert len({sessions[0], sessions[2], sessions[3]}) == 3


# ─── 3. native tool calls

NAMED = {"type": "function", "function": {"name": "get_weather"}}
TOOL_CHOICES = [("chat", "required", "required"), ("chat", "auto", "auto"), ("chat", "named", NAMED),
                ("anthropic", {"type": "any"}, "required"), ("anthropic", {"type": "auto"}, "auto"),
                ("anthropic", "named", NAMED), ("responses", "required", "required"), ("responses", "named", NAMED)]


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_a_tool_call_comes_whole_and_its_result_goes_back_natively(connect, fake_api, kind, stream):
    """Arguments streamed in 5-character pieces make one call; the call and its result go back in OpenAI's form."""
    fake_api.script = [ApiReply(reasoning=REASONING, answer="", piece=5,
                                tool_calls=[{"name": "get_weather", "arguments": WEATHER_CALL}]),
                       ApiReply(reasoning="The tool answered.", answer="It is 31 C in Abu Dhabi.")]
    client = connect(kind, stream)
    opening = [client.user("Weather in Abu Dhabi?")]
    called = await client.ask(opening, tools=TOOLS[kind])
    assert [(name, arguments) for _, name, arguments in called.calls] == [("get_weather", WEATHER_CALL)]
    answered = await client.ask(opening + called.turn + client.results(called, "31 C"), tools=TOOLS[kind])
    assert answered.text == "It is 31 C in Abu Dhabi."
    first, second = fake_api.received
    assert (first.body["tools"], first.tool_formats) == ([UPSTREAM_TOOL], TOOL_FORMATS)
    turn, result = second.body["messages"][1:]
    [call] = turn["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == WEATHER_CALL
    assert turn["reasoning_content"] == REASONING
    assert result == {"role": "tool", "tool_call_id": call["id"], "content": "31 C"}
    assert second.tool_formats == TOOL_FORMATS


@pytest.mark.parametrize("kind,choice,upstream_choice", TOOL_CHOICES)
async def test_tool_choice_becomes_chats(connect, fake_api, kind, choice, upstream_choice):
    client = connect(kind, False)
    choice = client.tool_choice("get_weather") if choice == "named" else choice
    await client.ask([client.user("Weather?")], tools=TOOLS[kind], tool_choice=choice)
    sent = fake_api.received[-1]
    assert (sent.body["tools"], sent.body["tool_choice"], sent.tool_formats) == ([UPSTREAM_TOOL], upstream_choice,
                                                                                 TOOL_FORMATS)


# ─── 4. structured output

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
                  "required": ["city", "celsius"], "additionalProperties": False}
WEATHER_FORMAT = {"name": "weather", "schema": WEATHER_SCHEMA, "strict": True}
ABU_DHABI = {"city": "Abu Dhabi", "celsius": 31}


@WHOLE_OR_STREAMED
async def test_chats_json_schema_reaches_upstream_as_sent(connect, fake_api, stream):
    fake_api.reply = ApiReply(reasoning=REASONING, json_answer=ABU_DHABI)
    client = connect("chat", stream)
    said = await client.ask([client.user("Weather?")],
                            response_format={"type": "json_schema", "json_schema": WEATHER_FORMAT})
    assert json.loads(said.text) == ABU_DHABI
    assert fake_api.received[-1].body["response_format"] == {"type": "json_schema", "json_schema": WEATHER_FORMAT}


@WHOLE_OR_STREAMED
async def test_responses_text_format_reaches_upstream_as_chats_response_format(connect, fake_api, stream):
    fake_api.reply = ApiReply(reasoning=REASONING, json_answer=ABU_DHABI)
    client = connect("responses", stream)
    said = await client.ask("Weather?", text={"format": {"type": "json_schema", **WEATHER_FORMAT}})
    assert json.loads(said.text) == ABU_DHABI
    assert fake_api.received[-1].body["response_format"] == {"type": "json_schema", "json_schema": WEATHER_FORMAT}


@WHOLE_OR_STREAMED
async def test_chat_parse_returns_the_parsed_object(connect, fake_api, stream):
    fake_api.reply = ApiReply(reasoning=REASONING, json_answer=ABU_DHABI)
    completions = connect("chat", stream).sdk.chat.completions
    asked = {"model": MODEL, "messages": [{"role": "user", "content": "Weather?"}], "response_format": Weather}
    if stream:
        async with completions.stream(**asked) as streamed:
            completion = await streamed.get_final_completion()
    else:
        completion = await completions.parse(**asked)
    assert completion.choices[0].message.parsed == Weather(**ABU_DHABI)
    sent = fake_api.received[-1].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Weather"


@WHOLE_OR_STREAMED
async def test_responses_parse_returns_the_parsed_object(connect, fake_api, stream):
    fake_api.reply = ApiReply(reasoning=REASONING, json_answer=ABU_DHABI)
    responses = connect("responses", stream).sdk.responses
    asked = {"model": MODEL, "input": "Weather?", "text_format": Weather}
    if stream:
        async with responses.stream(**asked) as streamed:
            response = await streamed.get_final_response()
    else:
        response = await responses.parse(**asked)
    assert response.output_parsed == Weather(**ABU_DHABI)
    sent = fake_api.received[-1].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Weather"


# ─── 5. effort

EFFORTS = [
    ("chat", {"reasoning_effort": "none"}, "low"), ("chat", {"reasoning_effort": "minimal"}, "low"),
    ("chat", {"reasoning_effort": "low"}, "low"), ("chat", {"reasoning_effort": "medium"}, "medium"),
    ("chat", {"reasoning_effort": "high"}, "high"), ("chat", {"reasoning_effort": "xhigh"}, "high"),
    ("chat", {}, "high"),
    ("anthropic", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
    ("anthropic", {"thinking": {"type": "enabled", "budget_tokens": 8000}}, "medium"),
    ("anthropic", {"thinking": {"type": "enabled", "budget_tokens": 20000}}, "high"),
    ("anthropic", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, "low"),
    ("anthropic", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "medium"}}, "medium"),
    ("anthropic", {"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, "high"),
    ("anthropic", {"thinking": None}, "high"), ("anthropic", {"thinking": {"type": "adaptive"}}, "high"),
    ("responses", {"reasoning": {"effort": "minimal", "summary": "auto"}}, "low"),
    ("responses", {"reasoning": {"effort": "low"}}, "low"),
    ("responses", {"reasoning": {"effort": "medium"}}, "medium"),
    ("responses", {"reasoning": {"effort": "xhigh"}}, "high"), ("responses", {"reasoning": None}, "high"),
]


@pytest.mark.parametrize("kind,asked,effort", EFFORTS)
@WHOLE_OR_STREAMED
async def test_effort_lands_in_chat_template_kwargs_clamped_to_k2s(connect, fake_api, kind, asked, effort, stream):
    client = connect(kind, stream)
    said = await client.ask([client.user("Hi")], **asked)
    assert said.text == ANSWER
    sent = fake_api.received[-1]
    assert (sent.effort, sent.effort_places, sent.extra_body) == (effort, ["chat_template_kwargs"], False)
    assert sent.body["chat_template_kwargs"] == {"reasoning_effort": effort}


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_a_nothink_model_thinks_low_and_shows_no_reasoning(connect, fake_api, kind, stream):
    client = connect(kind, stream)
    said = await client.ask([client.user("Hi")], model=MODEL + "-nothink", **NO_REASONING_SHOWN[kind])
    assert (said.text, said.reasoning) == (ANSWER, "")
    sent = fake_api.received[-1]
    assert (sent.body["model"], sent.effort, sent.effort_places) == (MODEL, "low", ["chat_template_kwargs"])


# ─── 6. text only

IMAGE_PLACES = {"chat": "messages[0].content[1]", "anthropic": "messages[0].content[1]",
                "responses": "input[0].content[1]"}


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_text_parts_go_upstream_as_one_string(connect, fake_api, kind, stream):
    client = connect(kind, stream)
    await client.ask([client.user(TEXT_PARTS[kind])])
    assert upstream_messages(fake_api) == [{"role": "user", "content": "First line.\nSecond line."}]


def error_of(kind, raised):
    """(message, param) of the error the SDK raised, checked to be in the dialect's shape (Anthropic's has no param)."""
    body = raised.value.body
    if kind == "anthropic":
        assert raised.value.status_code == 400 and body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        return body["error"]["message"], None
    assert raised.value.status_code == 400 and body["type"] == "invalid_request_error"  # the SDK unwraps "error"
    return body["message"], body["param"]


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_an_image_is_a_400_in_the_dialects_shape_naming_the_part(connect, fake_api, kind, stream):
    client = connect(kind, stream)
    error = anthropic.BadRequestError if kind == "anthropic" else openai.BadRequestError
    with pytest.raises(error) as raised:
        await client.ask([client.user([TEXT_PARTS[kind][0], IMAGE_PARTS[kind]])])
    message, param = error_of(kind, raised)
    assert IMAGE_PLACES[kind] in message and "image" in message
    assert param == (None if kind == "anthropic" else IMAGE_PLACES[kind])
    assert fake_api.received == []


# ─── 7. sampling

SAMPLING = {
    "chat": ({"temperature": 0.3, "top_p": 0.9, "max_tokens": 600, "stop": ["END", "STOP"], "seed": 7},
             {"temperature": 0.3, "top_p": 0.9, "max_tokens": 600, "stop": ["END", "STOP"], "seed": 7}),
    "anthropic": ({"extra_body": {"temperature": 0.3, "top_p": 0.9}, "max_tokens": 600,  # this SDK has no
                   "stop_sequences": ["END", "STOP"]},                                 # parameters for the two
                  {"temperature": 0.3, "top_p": 0.9, "max_tokens": 600, "stop": ["END", "STOP"]}),
    "responses": ({"temperature": 0.3, "top_p": 0.9, "max_output_tokens": 600},
                  {"temperature": 0.3, "top_p": 0.9, "max_tokens": 600}),
}


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_sampling_options_reach_upstream(connect, fake_api, kind, stream):
    client = connect(kind, stream)
    asked, upstream = SAMPLING[kind]
    said = await client.ask([client.user("Hi")], **asked)
    assert said.text == ANSWER
    sent = fake_api.received[-1].body
    assert {name: sent.get(name) for name in upstream} == upstream


@pytest.mark.parametrize("kind,field_name", [("chat", "stop"), ("anthropic", "stop_sequences")])
@WHOLE_OR_STREAMED
async def test_five_stop_sequences_is_a_400_naming_the_field(connect, fake_api, kind, field_name, stream):
    client = connect(kind, stream)
    error = anthropic.BadRequestError if kind == "anthropic" else openai.BadRequestError
    with pytest.raises(error) as raised:
        await client.ask([client.user("Hi")], **{field_name: ["a", "b", "c", "d", "e"]})
    message, param = error_of(kind, raised)
    assert field_name in message and param == (None if kind == "anthropic" else field_name)
    assert fake_api.received == []


# ─── 8. the empty follow-up of a self-hosted server

LOW_EFFORT = {"chat": {"reasoning_effort": "low"},
              "anthropic": {"thinking": {"type": "enabled", "budget_tokens": 1024}},
              "responses": {"reasoning": {"effort": "low", "summary": "auto"}}}


@EACH_DIALECT
@WHOLE_OR_STREAMED
@pytest.mark.parametrize("closer", ["<ifm|think>", "</ifm|think>"])
async def test_an_all_reasoning_follow_up_is_split_at_its_closer(connect, fake_api, kind, stream, closer):
    """Self-hosted servers file a low-effort follow-up wholly under reasoning; the answer must still be the answer."""
    fake_api.self_hosted = True
    fake_api.reply = ApiReply(reasoning=REASONING, answer=ANSWER, closer=closer)
    client = connect(kind, stream)
    opening = [client.user("Hi")]
    first = await client.ask(opening)
    said = await client.ask(opening + first.turn + [client.user("And how are you?")], **LOW_EFFORT[kind])
    assert fake_api.received[-1].effort == "low"
    assert (said.text, said.reasoning) == (ANSWER, REASONING)


# ─── 9. what a careless reader would break on: a character cut between chunks, arguments nested too deeply

@pytest.fixture
async def raw_api(aiohttp_server):
    """An OpenAI-compatible upstream that sends the SSE chunks of `chunks`, one write each."""
    sent = {"chunks": []}

    async def completions(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in sent["chunks"]:
            await response.write(f"data: {chunk}\n\n".encode())
            await asyncio.sleep(0.01)  # pacing: each chunk its own network read
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    server = await aiohttp_server(app)
    sent["url"] = str(server.make_url("")).rstrip("/")
    return sent


@DIALECTS
async def test_an_emoji_cut_between_two_chunks_of_the_api_arrives_whole(api_proxy, raw_api, path):
    proxy = await api_proxy(base=raw_api["url"])
    raw_api["chunks"] = ['{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}',
                         '{"choices": [{"index": 0, "delta": {"content": "A \\ud83d"}}]}',
                         '{"choices": [{"index": 0, "delta": {"content": "\\ude00 B"}}]}',
                         '{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}', "[DONE]"]
    response = await asyncio.wait_for(proxy.post(path, json=asked(path, stream=True), headers=AUTH), 10)
    raw = (await asyncio.wait_for(response.read(), 10)).decode()
    assert stream_text_of(path, raw) == "A \U0001f600 B" and stream_ended_well(path, raw)


@pytest.mark.parametrize("path", [MESSAGES, RESPONSES])
async def test_a_native_tool_call_nested_too_deeply_from_the_api_is_never_a_500(api_proxy, fake_api, path):
    proxy = await api_proxy()
    fake_api.reply = ApiReply(tool_calls=[{"name": "f", "arguments": DEEP}])
    schema = {"type": "object"}
    tools = {MESSAGES: [{"name": "f", "input_schema": schema}],
             RESPONSES: [{"type": "function", "name": "f", "parameters": schema}]}[path]
    for stream in (False, True):
        response = await proxy.post(path, json=asked(path, tools=tools, stream=stream), headers=AUTH)
        assert response.status == 200
        raw = (await response.read()).decode()
        assert stream_ended_well(path, raw) if stream else json.loads(raw)


# ─── 10. a request not streamed asks the API for one JSON answer, read by the documented grammar ───

@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_not_streamed_is_asked_of_the_api_as_one_answer(api_proxy, fake_api, stream):
    proxy = await api_proxy()
    response = await proxy.post(CHAT, json=asked(CHAT, stream=stream), headers=AUTH)
    assert response.status == 200
    sent = fake_api.received[-1].body
    assert sent["stream"] is stream and ("stream_options" in sent) is stream


texts = st.text(max_size=30)
absent = object()  # a field left out of the message
tool_calls = st.lists(st.fixed_dictionaries({"id": st.text(min_size=1, max_size=8), "type": st.just("function"),
                                             "function": st.fixed_dictionaries({
                                                 "name": st.from_regex(r"[a-z_]{1,10}", fullmatch=True),
                                                 "arguments": st.text(max_size=30)})}), max_size=3)


@given(reasoning=st.one_of(st.just(absent), st.none(), texts), mirror_only=st.booleans(),
       content=st.one_of(st.just(absent), st.none(), texts), calls=tool_calls,
       finish=st.sampled_from(["stop", "length", "tool_calls", None]),
       usage=st.one_of(st.none(), st.fixed_dictionaries({"prompt_tokens": st.integers(0, 10**6),
                                                          "completion_tokens": st.integers(0, 10**6)})),
       noise=st.dictionaries(st.sampled_from(["refusal", "annotations", "audio", "function_call"]),
                             st.none(), max_size=2),
       cut=st.one_of(st.none(), st.floats(0, 0.999)))
def test_a_whole_answer_of_the_api_is_read_by_its_grammar(reasoning, mirror_only, content, calls, finish, usage,
                                                          noise, cut):
    """shared/ifm-api.md's "Response": the reasoning as reasoning_content and its mirror reasoning (or the mirror
    alone), content, tool calls, the finish reason and usage, whatever else the message holds; a body cut anywhere
    is a truncated answer, tried again on the next key."""
    message = {"role": "assistant", **noise}
    if reasoning is not absent:
        message.update({"reasoning": reasoning} if mirror_only else {"reasoning_content": reasoning,
                                                                      "reasoning": reasoning})
    if content is not absent:
        message["content"] = content
    message["tool_calls"] = calls
    body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
                       "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                       **({"usage": usage} if usage else {})}, ensure_ascii=False).encode()
    if cut is not None:
        with pytest.raises(k2proxy.UpstreamError) as truncated:
            k2proxy.answer_delta(body[:int(len(body) * cut)])
        assert truncated.value.failure is k2proxy.TRUNCATED
        return
    delta = k2proxy.answer_delta(body)
    assert (delta.reasoning, delta.text) == (reasoning if isinstance(reasoning, str) else "",
                                            content if isinstance(content, str) else "")
    assert [(piece.index, piece.name, piece.arguments) for piece in delta.calls] == [
        (index, call["function"]["name"], call["function"]["arguments"]) for index, call in enumerate(calls)]
    assert (delta.finish_reason, delta.usage, delta.ended) == (finish, usage, True)
