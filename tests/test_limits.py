"""Limits that keep one client from taking the proxy down: the memory budget for bodies (what parsing them takes
included), bodies built to expand, BODY_TIMEOUT, JSON nested too deeply or not strict (NaN, Infinity), bodies sent
without a key, the answer kept for a non-streamed response (hidden reasoning included), and the overall deadline of a
completion."""

import asyncio
import json
import tracemalloc

import pytest
from conftest import (
    ALICE,
    API_KEY,
    AUTH,
    BOB,
    CHAT,
    COUNT,
    DEEP,
    MESSAGES,
    MODEL,
    RESPONSES,
    asked,
    chat,
    expanding_body,
    read_sse,
    state_of,
    stream_ended_well,
    until,
)
from fake_api import ApiReply
from fake_site import Reply
from hypothesis import given, settings
from hypothesis import strategies as st

import k2proxy


async def post_raw(proxy, data, path="/v1/chat/completions", headers=AUTH):
    return await proxy.post(path, data=data, headers={**headers, "Content-Type": "application/json"})


@pytest.mark.parametrize("path,shape", [("/v1/chat/completions", "error"), ("/v1/messages", "type"),
                                        ("/v1/responses", "error")])
async def test_a_body_built_to_expand_is_refused_before_it_is_parsed(make_proxy, fake, monkeypatch, path, shape):
    proxy = await make_proxy(MAX_REQUEST_MB="4")
    parsed = []
    monkeypatch.setattr(k2proxy, "parse_body", lambda *args, **kwargs: parsed.append(1))
    response = await post_raw(proxy, expanding_body(3 * k2proxy.MB), path)
    body = await response.json()
    assert response.status == 413 and shape in body and "small values" in json.dumps(body)
    assert parsed == [] and fake.received == []


def test_real_bodies_are_not_taken_for_expanding_ones():
    csv = "name,age,city\n" + "ann,30,paris\n" * 200_000
    for text in (csv, json.dumps([{"id": n, "tags": ["a", "b"]} for n in range(60_000)]), "x" * 3_000_000):
        raw = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
        assert len(raw) > k2proxy.EXPANSION_FLOOR and k2proxy.parse_cost(raw) <= k2proxy.MAX_EXPANSION * len(raw)
        assert k2proxy.parse_body(raw)["messages"][0]["content"] == text
    for attack in (b'{"x": [' + b'"ab",' * 400_000 + b'"ab"]}', b'{"x": [' + b"1," * 900_000 + b"1]}"):
        with pytest.raises(k2proxy.ApiError) as refused:
            k2proxy.parse_cost(attack)
        assert refused.value.status == 413


# ─── what parsing takes, against what the budget is charged: the grammar of JSON bodies, generated ───

CHARACTERS = {  # how wide CPython keeps a string of them
    "ascii": st.characters(max_codepoint=0x7F), "latin-1": st.characters(min_codepoint=0x80, max_codepoint=0xFF),
    "two bytes": st.characters(min_codepoint=0x100, max_codepoint=0xFFFF, exclude_categories=("Cs",)),
    "four bytes": st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF)}
texts = st.lists(st.sampled_from(list(CHARACTERS)), min_size=1, max_size=3).flatmap(
    lambda kinds: st.text(st.one_of(*(CHARACTERS[kind] for kind in kinds)), max_size=40))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                    st.floats(allow_nan=False, allow_infinity=False), texts)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner,
                                                                                                   max_size=4),
                           max_leaves=12)


@settings(max_examples=60)
@given(unit=json_values, text=texts, repeat=st.integers(1, 3000), long_text=st.integers(0, 300_000),
       ascii_only=st.booleans(), compact=st.booleans())
def test_what_parsing_a_body_takes_is_within_what_the_budget_is_charged(unit, text, repeat, long_text, ascii_only,
                                                                        compact):
    """The peak of reading a body (its text decoded, its JSON parsed) is within BODY_MEMORY_FACTOR times its size
    (its bytes, their text) and parse_cost, or the body is refused before it is parsed; whatever its characters
    (one emoji makes a text four times wider), escapes (\\ud83d\\ude00 widens a string) and values."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": (text or "x") * (long_text // max(1, len(text)))}],
            "x": [unit] * repeat}
    raw = json.dumps(body, ensure_ascii=ascii_only, separators=(",", ":") if compact else None).encode()
    try:
        charged = (k2proxy.BODY_MEMORY_FACTOR - 1) * len(raw) + k2proxy.parse_cost(raw)  # less its bytes, held apart
    except k2proxy.ApiError as refused:
        assert refused.status == 413 and len(raw) > k2proxy.EXPANSION_FLOOR
        return
    tracemalloc.start()
    try:
        parsed = k2proxy.parse_body(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parsed == json.loads(raw)
    assert peak <= charged + PARSE_OVERHEAD, f"{peak} bytes at the peak, {charged} charged, for {len(raw)}"


PARSE_OVERHEAD = 64 * 1024  # what parsing any body takes besides its values (the decoder's own state)


@pytest.mark.parametrize("depth", [65, 100_000])
async def test_json_nested_too_deeply_is_a_400_anywhere_in_the_body(proxy, fake, depth):
    nested = "[" * depth + "]" * depth
    for body in (f'{{"model": "m", "messages": {nested}}}', f'{{"tools": [{{"type": "function", "function": {{'
                 f'"name": "f", "parameters": {{"properties": {nested}}}}}}}]}}'):
        response = await post_raw(proxy, body.encode())
        error = (await response.json())["error"]
        assert response.status == 400 and error["code"] == "json_too_deep"
    assert fake.received == []


async def test_json_nested_within_the_limit_is_fine(proxy, fake):
    schema = {"type": "object"}
    for _ in range(20):  # 40 levels of JSON, deeper than real schemas go
        schema = {"type": "object", "properties": {"inner": schema}}
    tools = [{"type": "function", "function": {"name": "deep", "parameters": schema}}]
    assert (await proxy.post("/v1/chat/completions", json=chat(tools=tools), headers=AUTH)).status == 200


async def test_bodies_beyond_the_budget_wait_then_get_a_503(make_proxy, fake, monkeypatch):
    monkeypatch.setattr(k2proxy, "BODY_WAIT_SECONDS", 0.2)
    proxy = await make_proxy(MAX_REQUEST_MB="1", MEMORY_BUDGET_MB="4")
    budget = proxy.server.app[k2proxy.STATE].budget
    await budget.admit(budget.limit)  # another request holds it all
    small = await proxy.get("/v1/models", headers=AUTH)
    assert small.status == 200, "requests without a body never wait"
    response = await proxy.post("/v1/messages", json={"model": "claude-x", "max_tokens": 5, "messages": []},
                                headers=AUTH)
    assert response.status == 529 and response.headers["retry-after"] == "1"
    assert (await response.json())["error"]["type"] == "overloaded_error"
    waiting = asyncio.ensure_future(proxy.post("/v1/chat/completions", json=chat(), headers=AUTH))
    await until(lambda: budget.waiting)
    budget.release(budget.limit)
    assert (await asyncio.wait_for(waiting, 5)).status == 200 and budget.used == 0


def test_the_budget_admits_what_fits_and_wakes_waiters_in_order():
    async def run():
        budget = k2proxy.MemoryBudget(1 / k2proxy.MB * 100)  # 100 bytes
        await budget.admit(60)
        first = asyncio.ensure_future(budget.admit(50))
        second = asyncio.ensure_future(budget.admit(30))
        await asyncio.sleep(0)
        assert budget.used == 90 and second.done() and not first.done(), "what fits goes first"
        budget.release(60)
        await asyncio.wait_for(first, 1)
        assert budget.used == 80 and not budget.waiting
    asyncio.run(run())


def test_a_body_admitted_as_its_wait_times_out_gives_its_share_back(monkeypatch):
    async def admitted_as_time_runs_out(waiter, seconds):
        budget.release(60)  # the first body ends: the waiter is granted its share ...
        assert waiter.done()
        raise asyncio.TimeoutError  # ... in the same turn as its timeout fires

    async def run():
        await budget.admit(60)
        monkeypatch.setattr(k2proxy.asyncio, "wait_for", admitted_as_time_runs_out)
        with pytest.raises(k2proxy.ApiError):
            await budget.admit(50)
        assert budget.used == 0, "the refused body holds nothing"
    budget = k2proxy.MemoryBudget(1 / k2proxy.MB * 100)  # 100 bytes
    asyncio.run(run())


async def test_a_body_sent_without_a_key_is_not_read(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 2000000000\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)  # the whole answer, then the end of the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401") and json.loads(body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(ConnectionError):
        for _ in range(200):  # the proxy has hung up: the body cannot go on for long
            writer.write(b"x" * 65536)
            await writer.drain()
    writer.close()


async def test_a_non_streamed_answer_beyond_max_answer_mb_is_a_502(make_proxy, fake):
    proxy = await make_proxy(MAX_ANSWER_MB="0.01")
    fake.reply = Reply(reasoning="r", answer="a" * 20_000, piece=1000)
    response = await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    error = (await response.json())["error"]
    assert response.status == 502 and error["code"] == "upstream_answer_too_large" and "stream" in error["message"]
    events, _ = await read_sse(await proxy.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH))
    assert events[-1] == "[DONE]" and "error" not in events[-2], "a stream passes the answer on, whatever its size"
    assert proxy.server.app[k2proxy.STATE].site.pool.counts()["total"] == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_an_endless_answer_ends_at_completion_timeout(make_proxy, fake, stream):
    proxy = await make_proxy(COMPLETION_TIMEOUT="0.5", REQUEST_TIMEOUT="5")
    fake.reply = Reply(reasoning="thinking " * 10_000, piece=5, delay=0.01, style="incremental", markup="tags")
    response = await asyncio.wait_for(proxy.post("/v1/chat/completions", json=chat(stream=stream), headers=AUTH), 10)
    if stream:
        events, _ = await read_sse(response)
        assert events[-2]["error"]["code"] == "upstream_timeout"
        assert "COMPLETION_TIMEOUT" in events[-2]["error"]["message"]
    else:
        assert response.status == 504 and (await response.json())["error"]["code"] == "upstream_timeout"
    await asyncio.wait_for(fake.client_gone.wait(), 5)


def error_of(path, body):
    """The error object of an error answer, checked to be in the shape of the route's dialect."""
    if path in (MESSAGES, COUNT):
        assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def answer_of(response):
    """Status, headers and JSON body of a raw HTTP/1.1 answer read from a socket (a Content-Length body)."""
    head = await response.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)}
    body = await response.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.mark.parametrize("path", [CHAT, MESSAGES, COUNT, RESPONSES])
async def test_a_body_slower_than_body_timeout_is_a_408_and_gives_its_budget_back(make_proxy, fake, path):
    proxy = await make_proxy(BODY_TIMEOUT="0.3")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\": ".encode())
        await writer.drain()  # ... and the rest never comes
        status, _, body = await asyncio.wait_for(answer_of(reader), 5)
    finally:
        writer.close()
    error = error_of(path, body)
    assert status == 408 and "BODY_TIMEOUT" in error["message"]
    assert path in (MESSAGES, COUNT) or error["code"] == "body_timeout"
    await until(lambda: state_of(proxy).budget.used == 0)
    assert fake.received == []


def messages_body(size):
    """About `size` bytes of a completion request of many short messages: nine or ten times its size once parsed
    (as parse_cost counts it), under MAX_EXPANSION."""
    head, tail = b'{"model": "' + MODEL.encode() + b'", "messages": [', b'{"role": "user", "content": "hi"}]}'
    message = b'{"role": "user", "content": "' + b"m" * 40 + b'"},'
    return head + message * ((size - len(head) - len(tail)) // len(message)) + tail


def rows_body(size):
    """About `size` bytes of a completion request of rows of two numbers and a word: 11 times its size parsed."""
    head, tail = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "x": [', b"]}"
    row = b'[123456, 246912, "ab"],'
    return head + row * ((size - len(head) - len(tail)) // len(row)) + b"[1, 2, 3]" + tail


async def test_what_parsing_a_body_takes_is_held_against_the_budget_while_its_request_runs(make_proxy, fake,
                                                                                              monkeypatch):
    monkeypatch.setattr(k2proxy, "BODY_WAIT_SECONDS", 0.2)
    proxy = await make_proxy(MAX_REQUEST_MB="1", MEMORY_BUDGET_MB="4", REQUEST_TIMEOUT="30")
    limit = state_of(proxy).budget.limit
    first = rows_body(100_000)
    first_cost = k2proxy.parse_cost(first)
    assert first_cost > 5 * len(first), "parsing it takes several times its size"
    # a plain body that fits beside the first one's bytes, but not beside what parsing the first one took
    room = limit - 3 * len(first) - first_cost
    second = json.dumps(chat("x" * (room // 4 + 40_000))).encode()
    assert 4 * len(first) + 4 * len(second) < limit < 3 * len(first) + first_cost + 3 * len(second) + len(second)
    fake.script = [Reply(hang_after=2)]  # the first request stays in flight; the next ones are answered
    running = asyncio.ensure_future(proxy.post(CHAT, data=first, headers={**AUTH, "Content-Type": "application/json"}))
    try:
        await until(lambda: len(fake.received) == 1)
        waited = await proxy.post(CHAT, data=second, headers={**AUTH, "Content-Type": "application/json"})
        assert waited.status == 503, "the first request's parsed body still holds its share"
        assert waited.headers["Retry-After"] == "1" and (await waited.json())["error"]["code"] == "busy"
        assert len(fake.received) == 1
    finally:
        running.cancel()
    await until(lambda: state_of(proxy).budget.used == 0)
    served = await proxy.post(CHAT, data=second, headers={**AUTH, "Content-Type": "application/json"})
    assert served.status == 200, "alone, it fits"


async def test_a_body_that_can_never_fit_the_budget_is_not_told_to_try_again(make_proxy, fake, monkeypatch):
    """The defaults at 1/16 scale: a body within MAX_REQUEST_MB and MAX_EXPANSION, on an idle proxy."""
    monkeypatch.setattr(k2proxy, "BODY_WAIT_SECONDS", 0.2)
    proxy = await make_proxy(MAX_REQUEST_MB="2", MEMORY_BUDGET_MB="24")
    body = messages_body(1_950_000)
    assert k2proxy.EXPANSION_FLOOR < len(body) < 2 * k2proxy.MB
    assert 8 * len(body) < k2proxy.parse_cost(body) <= k2proxy.MAX_EXPANSION * len(body)
    response = await proxy.post(CHAT, data=body, headers={**AUTH, "Content-Type": "application/json"})
    answer = await response.json()
    assert response.status in (200, 413), f"{response.status} {answer}: no retry can ever be served"
    assert response.status == 200 or "Retry-After" not in response.headers


async def test_a_stored_read_and_a_continuation_take_their_share_of_the_budget(make_proxy, fake, monkeypatch):
    monkeypatch.setattr(k2proxy, "BODY_WAIT_SECONDS", 0.2)
    proxy = await make_proxy(MAX_REQUEST_MB="1", MEMORY_BUDGET_MB="4")
    budget = state_of(proxy).budget
    stored = await (await proxy.post(RESPONSES, json=asked(RESPONSES), headers=AUTH)).json()
    path = f"{RESPONSES}/{stored['id']}"
    await budget.admit(budget.limit)  # other requests hold it all
    try:
        read = await proxy.get(path, headers=AUTH)
        assert read.status == 503 and read.headers["Retry-After"] == "1"
    finally:
        budget.release(budget.limit)
    follow_up = json.dumps(asked(RESPONSES, "More", previous_response_id=stored["id"])).encode()
    others = budget.limit - 3 * len(follow_up) - k2proxy.parse_cost(follow_up)  # all but what its body takes
    await budget.admit(others)
    try:
        continued = await proxy.post(RESPONSES, data=follow_up, headers={**AUTH, "Content-Type": "application/json"})
        assert continued.status == 503 and (await continued.json())["error"]["code"] == "busy"
        assert len(fake.received) == 1, "the continuation was not sent upstream"
    finally:
        budget.release(others)
    assert (await proxy.get(path, headers=AUTH)).status == 200
    assert budget.used == 0


async def test_tool_arguments_nested_too_deeply_are_never_a_500(proxy, fake):
    deep = "[" * 3000 + "]" * 3000
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "done"}]
    response = await proxy.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}, headers=AUTH)
    assert response.status == 400 and (await response.json())["error"]["code"] == "json_too_deep"
    fake.reply = Reply(answer='<tool_call>{"name": "f", "arguments": ' + deep + "}</tool_call>")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    answered = await proxy.post("/v1/chat/completions", json=chat(tools=tools), headers=AUTH)
    assert answered.status == 200 and (await answered.json())["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path", [CHAT, RESPONSES])
async def test_a_clients_tool_arguments_nested_too_deeply_are_a_4xx(proxy, fake, path):
    if path == CHAT:
        turns = [{"role": "user", "content": "go"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "f", "arguments": DEEP}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "done"}]
        body = {"model": MODEL, "messages": turns}
    else:
        body = {"model": MODEL, "input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": DEEP},
                                          {"type": "function_call_output", "call_id": "c1", "output": "done"}]}
    response = await proxy.post(path, json=body, headers=AUTH)
    answer = await response.json()
    assert 400 <= response.status < 500, f"{response.status}: {json.dumps(answer)[:200]}"
    assert error_of(path, answer)["message"] and fake.received == [], "the client is told, nothing goes upstream"


async def test_nan_in_a_request_body_is_a_400(proxy, fake):
    body = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    response = await proxy.post("/v1/chat/completions", data=body,
                                headers={**AUTH, "Content-Type": "application/json"})
    assert response.status == 400 and "NaN" in (await response.json())["error"]["message"]
    assert fake.received == []


@pytest.mark.parametrize("path,metadata", [(RESPONSES, b'{"a": NaN}'), (RESPONSES, b'{"a": -Infinity}'),
                                           (MESSAGES, b'{"user_id": "u", "n": Infinity}'), (CHAT, b'{"a": NaN}')])
async def test_nan_and_infinity_in_a_body_are_a_400_never_echoed(proxy, fake, path, metadata):
    body = json.dumps(asked(path))[:-1].encode() + b', "metadata": ' + metadata + b"}"
    response = await proxy.post(path, data=body, headers={**AUTH, "Content-Type": "application/json"})
    text = await response.text()
    answer = json.loads(text, parse_constant=lambda name: pytest.fail(f"the answer holds {name}: {text[:300]}"))
    assert response.status == 400 and "is not a JSON number" in error_of(path, answer)["message"]
    assert fake.received == []


async def test_hidden_reasoning_counts_against_max_answer_mb(make_proxy, fake):
    proxy = await make_proxy(MAX_ANSWER_MB="0.001")
    fake.reply = Reply(reasoning="r" * 5000, answer="short")
    response = await proxy.post("/v1/chat/completions", json=chat(model=MODEL + "-nothink"), headers=AUTH)
    assert response.status == 502 and (await response.json())["error"]["code"] == "upstream_answer_too_large"


@pytest.mark.parametrize("kind", ["site", "api"])
@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES], ids=["chat-nothink", "anthropic", "responses"])
async def test_hidden_reasoning_of_a_whole_answer_counts_against_max_answer_mb(make_proxy, api_proxy, fake,
                                                                                fake_api, kind, path):
    proxy = await (api_proxy if kind == "api" else make_proxy)(MAX_ANSWER_MB="0.001")  # 1,048 characters
    fake.reply = Reply(reasoning="r" * 5000, answer="short")
    fake_api.reply = ApiReply(reasoning="r" * 5000, answer="short")
    body = asked(path, model=MODEL + "-nothink") if path == CHAT else asked(path)  # no reasoning shown
    response = await proxy.post(path, json=body, headers=AUTH)
    error = error_of(path, await response.json())
    assert response.status == 502 and "MAX_ANSWER_MB" in error["message"]
    streamed = await proxy.post(path, json={**body, "stream": True}, headers=AUTH)
    assert stream_ended_well(path, (await streamed.read()).decode()), "a stream holds none of it"


async def test_a_limited_keys_trickled_uploads_cannot_take_the_budget_from_another_key(keyed, fake, monkeypatch):
    monkeypatch.setattr(k2proxy, "BODY_WAIT_SECONDS", 0.5)
    proxy = await keyed(alice_limits="rpm=1000", MAX_REQUEST_MB="1", MEMORY_BUDGET_MB="8")
    budget, never = state_of(proxy).budget, asyncio.Event()

    async def trickle():
        """A chunked upload that never ends: it holds BODY_MEMORY_FACTOR times MAX_REQUEST_MB from its start."""
        async def chunks():
            yield b'{"model": "'
            await never.wait()
        return await proxy.post(CHAT, data=chunks(), headers={"Authorization": f"Bearer {ALICE}",
                                                                "Content-Type": "application/json"})
    uploads = [asyncio.ensure_future(trickle()) for _ in range(3)]
    try:
        await until(lambda: budget.held["alice"] == 3 * k2proxy.MB and len(budget.waiting) == 2)
        assert budget.used <= budget.key_share, "alice holds her share, no more"
        body = json.dumps(chat("y" * 900_000)).encode()
        response = await proxy.post(CHAT, data=body, headers={"Authorization": f"Bearer {BOB}",
                                                               "Content-Type": "application/json"})
        assert response.status == 200, await response.text()
        refused = await asyncio.wait_for(asyncio.gather(*uploads[1:]), 5)
        assert [answer.status for answer in refused] == [503, 503], "alice's uploads beyond her share wait, then 503"
    finally:
        never.set()
        for upload in uploads:
            upload.cancel()
