"""Hardening, round 3, finding by finding, as clients, operators and the log see it; the figures from a real process."""

import asyncio
import json
import logging
import os
import pathlib
import re
import stat
import time

import aiohttp
import pytest
from aiohttp import web
from conftest import ADMIN, API_KEY, AUTH, E2E_KEY, MODEL, chat, until
from fake_upstream import ApiReply, Reply, make_jwt
from test_load import peak_rss_kb

import k2proxy

ALICE, BOB, CAROL = "sk-alice-hardening-0001", "sk-bob-hardening-0002", "sk-carol-hardening-0003"
CHAT, MESSAGES, COUNT, RESPONSES = "/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses"
DIALECTS = pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES], ids=["chat", "anthropic", "responses"])
CONTROL = re.compile("[\x00-\x1f\x7f\u2028\u2029]")


def as_key(key):
    return {"Authorization": f"Bearer {key}"}


def state_of(proxy):
    return proxy.server.app[k2proxy.STATE]


def asked(path, content="Hi", stream=False, **extra):
    """A minimal request of the dialect served at `path`."""
    if path == CHAT:
        return chat(content, stream=stream, **extra)
    if path in (MESSAGES, COUNT):
        body = {"model": MODEL, "max_tokens": 4096, "messages": [{"role": "user", "content": content}], **extra}
        return body if path == COUNT else {**body, "stream": stream}
    return {"model": MODEL, "input": content, "stream": stream, **extra}


def error_of(path, body):
    """The error object of an error answer, checked to be in the shape of the route's dialect."""
    if path in (MESSAGES, COUNT):
        assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture
async def keyed(make_proxy, tmp_path):
    """A proxy whose named keys are alice (with the limits a test gives) and bob (none)."""
    async def start(alice_limits="", **env):
        (tmp_path / "api_keys.txt").write_text(f"alice:{ALICE} {alice_limits}\nbob:{BOB}\n")
        return await make_proxy(API_KEYS_FILE=tmp_path / "api_keys.txt", **env)
    return start


@pytest.fixture
def api_proxy(make_proxy, fake_api, tmp_path):
    """A proxy whose upstream is the fake IFM API, holding the IFM key `key`."""
    async def start(key="IFM-hardening-key-0000aaa", base=None, **env):
        return await make_proxy(UPSTREAM="api", IFM_BASE_URL=(base or fake_api.url) + "/v1", IFM_API_KEY=key,
                                IFM_KEYS_FILE=tmp_path / "ifm_keys.txt", **env)
    return start


async def answer_of(response):
    """Status, headers and JSON body of a raw HTTP/1.1 answer read from a socket (a Content-Length body)."""
    head = await response.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)}
    body = await response.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), headers, json.loads(body)


# ─── 1. Bodies: the memory budget, what parsing takes, BODY_TIMEOUT ─────────────

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
    first_cost = k2proxy.expanded_size(first)
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
    body = rows_body(1_950_000)
    assert k2proxy.EXPANSION_FLOOR < len(body) < 2 * k2proxy.MB
    assert 9 * len(body) < k2proxy.expanded_size(body) <= k2proxy.MAX_EXPANSION * len(body)
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
    others = budget.limit - 3 * len(follow_up) - k2proxy.expanded_size(follow_up)  # all but what its body takes
    await budget.admit(others)
    try:
        continued = await proxy.post(RESPONSES, data=follow_up, headers={**AUTH, "Content-Type": "application/json"})
        assert continued.status == 503 and (await continued.json())["error"]["code"] == "busy"
        assert len(fake.received) == 1, "the continuation was not sent upstream"
    finally:
        budget.release(others)
    assert (await proxy.get(path, headers=AUTH)).status == 200
    assert budget.used == 0


# ─── 2. Tool kinds left out: bounded, cut and escaped ─────────────────────────

@pytest.mark.parametrize("path", [MESSAGES, RESPONSES])
async def test_tool_kinds_left_out_are_noted_up_to_a_bound_each_cut_and_escaped(proxy, fake, caplog, path):
    caplog.set_level(logging.INFO, logger="k2proxy")
    tools = [{"type": f"kind_{number}\nFORGED " + "y" * 300, "name": "x"} for number in range(150)]
    response = await proxy.post(path, json=asked(path, tools=tools), headers=AUTH)
    assert response.status == 200
    noted = [r.getMessage() for r in caplog.records if "left out of the prompt" in r.getMessage()]
    assert len(noted) == len(state_of(proxy).tools_left_out) < 150, "a bound, whatever clients send"
    assert not any(line.startswith("FORGED") for line in caplog.text.splitlines())
    assert len(noted) == k2proxy.TOOL_KINDS_NOTED
    assert all(len(kind) <= k2proxy.TOOL_KIND_CHARS for kind in state_of(proxy).tools_left_out)
    assert "y" * (k2proxy.TOOL_KIND_CHARS + 1) not in caplog.text and "\\nFORGED" in caplog.text


# ─── 3. A named key's limits: from its headers on, on every /v1 route that works ───

async def test_an_upload_to_count_tokens_holds_one_of_its_keys_concurrent_slots(keyed, fake):
    proxy = await keyed("concurrent=1")
    release = asyncio.Event()

    async def trickle():
        yield b'{"model": "' + MODEL.encode() + b'", '
        await release.wait()
        yield b'"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'

    upload = asyncio.ensure_future(proxy.post(COUNT, data=trickle(), headers=as_key(ALICE)))
    try:
        await until(lambda: state_of(proxy).keys.named[0].active == 1)
        refused = await proxy.post(CHAT, json=chat(), headers=as_key(ALICE))
        assert refused.status == 429 and (await refused.json())["error"]["code"] == "too_many_at_once"
        assert (await proxy.post(CHAT, json=chat(), headers=as_key(BOB))).status == 200
    finally:
        release.set()
    counted = await asyncio.wait_for(upload, 5)
    assert counted.status == 200 and (await counted.json())["input_tokens"] > 0
    assert (await proxy.post(CHAT, json=chat(), headers=as_key(ALICE))).status == 200, "the slot is given back"


async def test_stored_response_reads_and_deletes_count_against_rpm(keyed, fake):
    proxy = await keyed("rpm=3")
    stored = await (await proxy.post(RESPONSES, json=asked(RESPONSES), headers=as_key(ALICE))).json()
    path = f"{RESPONSES}/{stored['id']}"
    assert (await proxy.get(path, headers=as_key(ALICE))).status == 200
    assert (await proxy.delete(path, headers=as_key(ALICE))).status == 200
    over = await proxy.get(path, headers=as_key(ALICE))
    error = (await over.json())["error"]
    assert over.status == 429 and error["code"] == "rate_limited" and 1 <= int(over.headers["Retry-After"]) <= 60
    assert (await proxy.get(path, headers=as_key(BOB))).status == 404, "another key has its own limits"


# ─── 4. Stored responses: the key's that stored them; their ids out of the log ───

async def test_a_stored_response_is_its_own_keys_even_between_two_valid_api_keys(make_proxy, fake, caplog):
    proxy = await make_proxy(VALID_API_KEY="sk-first-hardening,sk-second-hardening")
    first, second = as_key("sk-first-hardening"), as_key("sk-second-hardening")
    caplog.set_level(logging.INFO, logger="k2proxy")
    stored = await (await proxy.post(RESPONSES, json=asked(RESPONSES), headers=first)).json()
    response_id, path = stored["id"], f"{RESPONSES}/{stored['id']}"
    for method, body in (("GET", None), ("DELETE", None)):
        answer = await proxy.request(method, path, json=body, headers=second)
        assert answer.status == 404 and (await answer.json())["error"]["code"] == "response_not_found"
    follow_up = await proxy.post(RESPONSES, json=asked(RESPONSES, "More", previous_response_id=response_id),
                                 headers=second)
    error = (await follow_up.json())["error"]
    assert follow_up.status == 404 and error["param"] == "previous_response_id"
    assert len(fake.received) == 1, "nothing of the stored conversation went upstream for the other key"
    kept = await proxy.get(path, headers=first)
    assert kept.status == 200 and (await kept.json())["id"] == response_id
    assert (await proxy.delete(path, headers=first)).status == 200
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [line for line in lines if response_id in line]
    assert sum(f"{RESPONSES}/{{id}}" in line for line in lines) == 4  # two 404s, then a GET and a DELETE


async def test_the_store_counts_the_bytes_it_holds(make_proxy, fake):
    proxy = await make_proxy(RESPONSES_STORE_MB=str(50_000 / k2proxy.MB))
    store = state_of(proxy).responses
    fake.reply = Reply(answer="漢" * 3000)  # 3,000 characters, 9,000 bytes in UTF-8; twice in each entry
    ids = []
    for _ in range(3):
        answer = await proxy.post(RESPONSES, json=asked(RESPONSES), headers=AUTH)
        ids.append((await answer.json())["id"])
    statuses = [(await proxy.get(f"{RESPONSES}/{response_id}", headers=AUTH)).status for response_id in ids]
    assert statuses == [404, 200, 200], "two entries of about 20 KB fill 50 KB: the oldest went"
    held = [entry.data for entry in store.entries.values()]
    assert all(isinstance(data, bytes) for data in held)
    assert store.bytes == sum(map(len, held)) <= store.max_bytes
    assert json.loads(held[0])["response"]["id"] == ids[1]


# ─── 5. A stream always ends, in its dialect's way ─────────────────────────────

def ends_with_error(path, raw):
    """The code (or type) of the error a stream of `path` ended with, once it is checked to end as its dialect's do."""
    if path == CHAT:
        events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return json.loads(events[-2])["error"]["code"]
    names = [line[7:].strip() for line in raw.split("\n") if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: ")]
    if path == MESSAGES:
        assert names[-1] == "error"
        return data[-1]["error"]["type"]
    assert names[-1] == "response.failed" and data[-1]["response"]["status"] == "failed"
    return data[-1]["response"]["error"]["code"]


@DIALECTS
async def test_any_failure_after_a_stream_started_ends_it_with_the_dialects_error(proxy, fake, monkeypatch, caplog,
                                                                                 path):
    real_read = k2proxy.SiteReader.read

    def read_then_break(reader, frames):  # a bug anywhere, once text has reached the client
        delta = real_read(reader, frames)
        if getattr(reader, "text_seen", False):
            raise RuntimeError("a bug in the proxy")
        reader.text_seen = bool(delta.text)
        return delta

    monkeypatch.setattr(k2proxy.SiteReader, "read", read_then_break)
    fake.reply = Reply(answer="word " * 100, piece=5, delay=0.002)
    response = await asyncio.wait_for(proxy.post(path, json=asked(path, stream=True), headers=AUTH), 10)
    raw = (await asyncio.wait_for(response.read(), 10)).decode()
    assert response.status == 200 and "word" in raw
    assert ends_with_error(path, raw) in ("internal_error", "api_error")
    assert "a bug in the proxy" not in raw and "Traceback" not in raw
    assert "internal error in a completion" in caplog.text


async def test_an_answer_nested_too_deeply_ends_a_responses_stream_with_response_failed(proxy, fake):
    fake.reply = Reply(answer="[" * 5000 + "]" * 5000)
    body = asked(RESPONSES, stream=True, text={"format": {"type": "json_object"}}, reasoning={"summary": "auto"})
    response = await asyncio.wait_for(proxy.post(RESPONSES, json=body, headers=AUTH), 10)
    raw = (await asyncio.wait_for(response.read(), 10)).decode()
    assert response.status == 200 and ends_with_error(RESPONSES, raw) == "invalid_json_output"


def stream_text_of(path, raw):
    """The answer's text, as the client of that dialect reads it from a stream."""
    if path == CHAT:
        events = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    data = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: ")]
    if path == MESSAGES:
        return "".join(d["delta"].get("text", "") for d in data if d.get("type") == "content_block_delta")
    return "".join(d["delta"] for d in data if d.get("type") == "response.output_text.delta")


def stream_ended_well(path, raw):
    if path == CHAT:
        return raw.rstrip().endswith("data: [DONE]")
    return ("event: message_stop" if path == MESSAGES else "event: response.completed") in raw


@DIALECTS
async def test_an_emoji_cut_between_two_pieces_arrives_whole_from_the_site(proxy, fake, path):
    frames = ['{"choices": [{"delta": {"content": "A \\ud83d"}}]}',
              '{"choices": [{"delta": {"content": "\\ude00 B"}}]}',
              '{"choices": [{"delta": {}, "finish_reason": "stop"}]}']
    fake.reply = Reply(body="".join(f"data: {frame}\n\n" for frame in frames) + "data: [DONE]\n\n",
                       content_type="text/event-stream")
    response = await asyncio.wait_for(proxy.post(path, json=asked(path, stream=True), headers=AUTH), 10)
    raw = (await asyncio.wait_for(response.read(), 10)).decode()
    assert stream_text_of(path, raw) == "A \U0001f600 B" and stream_ended_well(path, raw)


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


# ─── 6. Hidden reasoning counts against MAX_ANSWER_MB ─────────────────────────

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


# ─── 7. Tool-call arguments nested too deeply: never a 500 ────────────────────

DEEP = "[" * 3000 + "]" * 3000


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


# ─── 8. Upstream error text: one line, short, no credential ───────────────────

async def test_an_api_upstream_that_echoes_its_key_shows_it_to_nobody(api_proxy, fake_api, caplog):
    key = "zz-plain-secret-0042"  # looks like no known kind of key: only knowing it was sent finds it
    jwt = make_jwt(time.time() + 3600)
    proxy = await api_proxy(key=key)
    caplog.set_level(logging.INFO, logger="k2proxy")
    fake_api.reply = ApiReply(status=400, error_message=f"the key {key} may not do that\nAuthorization: Bearer {key}"
                                                        f"\ncookie token={jwt}\n" + "padding " * 200)
    response = await proxy.post(CHAT, json=chat(), headers=AUTH)
    message = (await response.json())["error"]["message"]
    assert response.status == 400 and "the key" in message and "[redacted]" in message
    assert key not in message and jwt not in message and "\n" not in message
    assert len(message) < len("upstream answered HTTP 400 invalid_request_error: ") + k2proxy.ERROR_TEXT_CHARS + 1
    stats = await (await proxy.get("/admin/ifm-keys/stats", headers=ADMIN)).text()
    assert key not in caplog.text and jwt not in caplog.text and key not in stats


async def test_a_site_error_page_with_a_credential_is_summarised_without_it(make_proxy, fake, tmp_path, caplog):
    token = make_jwt(time.time() + 3600)
    (tmp_path / "tokens.txt").write_text(token + "\n")
    proxy = await make_proxy(PROXY_MODE="user", MAX_RETRIES="0")
    caplog.set_level(logging.INFO, logger="k2proxy")
    fake.reply = Reply(status=400, body="Bad request\nheaders were:\nAuthorization: Bearer " + token + "\n" * 50,
                       content_type="text/plain")
    response = await proxy.post(MESSAGES, json=asked(MESSAGES), headers=AUTH)
    message = (await response.json())["error"]["message"]
    assert response.status == 400 and "Bad request headers were" in message and "\n" not in message
    assert token not in message and token not in caplog.text


# ─── 9. What a client chose, in the log; strict JSON ─────────────────────────

async def test_control_characters_a_client_chose_are_escaped_in_every_log_line(proxy, fake, caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    await proxy.post(RESPONSES, json=asked(RESPONSES, model="k2\r\nFORGED 200 OK\u2028x"), headers=AUTH)
    await proxy.post(MESSAGES, json={**asked(MESSAGES), "model": "k2\nFORGED"}, headers=AUTH)
    await proxy.post("/v1/messages%0D%0AFORGED", json=asked(MESSAGES), headers=AUTH)
    await proxy.get("/v1/models/k2%0AFORGED", headers=AUTH)
    await proxy.post(RESPONSES, json=asked(RESPONSES, tools=[{"type": "web\nFORGED"}]), headers=AUTH)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "FORGED" in m]) >= 5
    assert [m for m in messages if CONTROL.search(m)] == []
    assert "k2\\r\\nFORGED 200 OK\\u2028x" in caplog.text


@pytest.mark.parametrize("path,metadata", [(RESPONSES, b'{"a": NaN}'), (RESPONSES, b'{"a": -Infinity}'),
                                           (MESSAGES, b'{"user_id": "u", "n": Infinity}'), (CHAT, b'{"a": NaN}')])
async def test_nan_and_infinity_in_a_body_are_a_400_never_echoed(proxy, fake, path, metadata):
    body = json.dumps(asked(path))[:-1].encode() + b', "metadata": ' + metadata + b"}"
    response = await proxy.post(path, data=body, headers={**AUTH, "Content-Type": "application/json"})
    text = await response.text()
    answer = json.loads(text, parse_constant=lambda name: pytest.fail(f"the answer holds {name}: {text[:300]}"))
    assert response.status == 400 and "is not a JSON number" in error_of(path, answer)["message"]
    assert fake.received == []


# ─── 10. Watched files: a half-written file, a bad line, reloads ──────────────

@pytest.fixture
def mid_write(monkeypatch):
    """Makes the next read of `path` see the file as a writer had half written it: the rest is written just after."""
    real = pathlib.Path.read_text

    def arm(path, rest):
        def read_text(self, *args, **kwargs):
            text = real(self, *args, **kwargs)
            if self == path and rest:
                with open(path, "a") as writer:
                    writer.write(rest.pop())
            return text
        monkeypatch.setattr(pathlib.Path, "read_text", read_text)
        return rest
    return arm


async def test_a_keys_file_read_while_it_was_written_is_not_taken_half(proxy_settings, tmp_path, mid_write):
    path = tmp_path / "api_keys.txt"
    path.write_text(f"alice:{ALICE}\n")
    keys = k2proxy.ApiKeys(proxy_settings(API_KEYS_FILE=path))
    await keys.reload()
    with open(path, "a") as writer:
        writer.write(f"bob:{BOB[:5]}")  # "sk-bo": a key anyone could guess
    mid_write(path, [BOB[5:] + "\n"])
    await keys.reload()
    assert [key.name for key in keys.named] == ["alice"] and keys.find(BOB[:5]) is None
    await keys.reload()
    assert keys.find(BOB).name == "bob" and keys.find(BOB[:5]) is None


async def test_a_token_file_read_while_it_was_written_is_not_taken_half(proxy_settings, tmp_path, mid_write):
    whole = make_jwt(time.time() + 3600)
    path = tmp_path / "tokens.txt"
    path.write_text(whole + "\n")
    settings = proxy_settings(PROXY_MODE="user")
    site = k2proxy.SiteUpstream(settings, k2proxy.HttpClient(settings))
    await site.pool.reload()
    other = make_jwt(time.time() + 7200, signature="c2Vjb25k")
    with open(path, "a") as writer:
        writer.write(other[:30])
    mid_write(path, [other[30:] + "\n"])
    await site.pool.reload()
    assert [c.value for c in site.pool.credentials] == [whole]
    await site.pool.reload()
    assert [c.value for c in site.pool.credentials] == [whole, other]


async def test_a_keys_file_with_a_line_that_does_not_parse_keeps_the_keys_loaded(keyed, fake, tmp_path, caplog):
    proxy = await keyed()
    caplog.set_level(logging.WARNING, logger="k2proxy")
    (tmp_path / "api_keys.txt").write_text(f"alice:{ALICE}\ncarol:{CAROL} rpm=often\n")  # bob gone, carol mistyped
    await until(lambda: "lines 2 are not" in caplog.text)
    statuses = [(await proxy.get("/v1/models", headers=as_key(key))).status for key in (ALICE, BOB, CAROL)]
    assert statuses == [200, 200, 401], "the last good set stays until the file is fixed"
    (tmp_path / "api_keys.txt").write_text(f"alice:{ALICE}\ncarol:{CAROL} rpm=5\n")
    await until(lambda: state_of(proxy).keys.find(CAROL) is not None)
    assert state_of(proxy).keys.find(BOB) is None


async def test_a_keys_new_value_keeps_its_counts(keyed, fake, tmp_path):
    proxy = await keyed("rpm=2 concurrent=5")
    for _ in range(2):
        assert (await proxy.post(CHAT, json=chat(), headers=as_key(ALICE))).status == 200
    rotated = "sk-alice-rotated-000009"
    (tmp_path / "api_keys.txt").write_text(f"alice:{rotated} rpm=2 concurrent=5\nbob:{BOB}\n")
    await until(lambda: state_of(proxy).keys.find(rotated) is not None)
    refused = await proxy.post(CHAT, json=chat(), headers=as_key(rotated))
    assert refused.status == 429 and (await refused.json())["error"]["code"] == "rate_limited"
    assert (await proxy.get("/v1/models", headers=as_key(ALICE))).status == 401


# ─── 11. Admin saves: no line lost, files 0600 ────────────────────────────────

SAVES = {  # admin route → (the file's name, the body of a save, a line another writer appends meanwhile)
    "/admin/keys/update": ("api_keys.txt", {"keys": [{"name": "alice", "key": ALICE}]}, f"carol:{CAROL}"),
    "/admin/tokens/update": ("tokens.txt", {"tokens": [make_jwt(time.time() + 3600)]},
                             make_jwt(time.time() + 7200, signature="YXBwZW5kZWQ")),
    "/admin/ifm-keys/update": ("ifm_keys.txt", {"tokens": ["IFM-saved-key-00000000aaa"]}, "IFM-appended-key-0000bbb"),
}


@pytest.fixture
def saving_proxy(make_proxy, tmp_path):
    """A proxy in user mode whose keys, token and IFM key files (each holding a line) are in tmp_path."""
    async def start(route, mode=0o600):
        name = SAVES[route][0]
        (tmp_path / name).write_text({"api_keys.txt": f"bob:{BOB}", "tokens.txt": make_jwt(time.time() + 60),
                                      "ifm_keys.txt": "IFM-first-key-000000000"}[name] + "\n")
        os.chmod(tmp_path / name, mode)
        return await make_proxy(PROXY_MODE="user", API_KEYS_FILE=tmp_path / "api_keys.txt",
                                IFM_KEYS_FILE=tmp_path / "ifm_keys.txt"), tmp_path / name
    return start


@pytest.mark.parametrize("route", list(SAVES))
async def test_an_admin_save_keeps_a_line_another_writer_appends_meanwhile(saving_proxy, fake, monkeypatch, route):
    proxy, path = await saving_proxy(route)
    _, body, appended = SAVES[route]
    real = k2proxy.write_atomically

    def another_writer_first(target, content):
        if target == path and appended not in target.read_text():
            with open(target, "a") as writer:
                writer.write(appended + "\n")
        return real(target, content)

    monkeypatch.setattr(k2proxy, "write_atomically", another_writer_first)
    saved = await proxy.post(route, json=body, headers=ADMIN)
    assert saved.status == 200, await saved.text()
    lines = path.read_text().split()
    saved_line = f"alice:{ALICE}" if route == "/admin/keys/update" else body["tokens"][0]
    assert saved_line in lines and appended in lines
    if route == "/admin/keys/update":
        assert (await proxy.get("/v1/models", headers=as_key(CAROL))).status == 200


@pytest.mark.parametrize("route", list(SAVES))
async def test_a_secret_file_open_to_others_is_warned_of_once_and_saved_0600(saving_proxy, fake, caplog, route):
    caplog.set_level(logging.WARNING, logger="k2proxy")
    proxy, path = await saving_proxy(route, mode=0o644)
    warning = f"{path} holds secrets but others may read it"
    await until(lambda: warning in caplog.text)
    with open(path, "a") as writer:  # read again, still open to others
        writer.write("# edited\n")
    watched = {"/admin/keys/update": state_of(proxy).keys.file, "/admin/tokens/update": state_of(proxy).site.pool.file,
               "/admin/ifm-keys/update": state_of(proxy).api.pool.file}[route]
    await until(lambda: watched.state == watched.stat())
    saved = await proxy.post(route, json=SAVES[route][1], headers=ADMIN)
    assert saved.status == 200 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert caplog.text.count(warning) == 1


# ─── 12. Upstream's Retry-After: at most an hour ──────────────────────────────

@pytest.mark.parametrize("kind", ["site", "api"])
async def test_upstreams_retry_after_reaches_clients_at_most_an_hour(make_proxy, api_proxy, fake, fake_api, tmp_path,
                                                                      kind):
    if kind == "site":
        (tmp_path / "tokens.txt").write_text(make_jwt(time.time() + 86400) + "\n")
        proxy = await make_proxy(PROXY_MODE="user")
        fake.reply = Reply(status=429, body='{"detail": "slow down"}', headers={"Retry-After": "99999999999"})
    else:
        proxy = await api_proxy()
        fake_api.reply = ApiReply(status=429, retry_after=99_999_999_999)
    for attempt in ("upstream asked", "the credential rests"):
        response = await proxy.post(CHAT, json=chat(), headers=AUTH)
        assert response.status == 429, attempt
        assert 1 <= int(response.headers["Retry-After"]) <= 3600, attempt
    stats = await (await proxy.get("/admin/tokens/stats" if kind == "site" else "/admin/ifm-keys/stats",
                                   headers=ADMIN)).json()
    assert stats["tokens"][0]["cooling_until"] <= time.time() + 3601


# ─── 13. The markup splitter: an unclosed <summary> held by nothing ───────────

def test_an_unclosed_summary_holds_nothing_back_and_a_closed_one_still_ends():
    reader = k2proxy.UpstreamText()
    reader.feed('<details type="reasoning" done="false">\n<summary>')
    for _ in range(3000):
        reasoning, answer = reader.feed("x" * 1024)
        assert (reasoning, answer) == ("", "")
        assert len(reader.splitter._pending) < len("</summary>"), "what waits for </summary> stays small"
    splitter = k2proxy.MarkupSplitter()
    reasoning, answer = [], []
    for char in '<details type="reasoning" done="true">\n<summary>Thought </summ</summary>\n> why\n</details>\nok':
        more_reasoning, more_answer = splitter.feed(char)
        reasoning.append(more_reasoning)
        answer.append(more_answer)
    last_reasoning, last_answer = splitter.finish()
    assert ("".join(reasoning) + last_reasoning).strip() == "why" and "".join(answer) + last_answer == "ok"


# ─── The issue's figures, from a real process (load tests: run with --load) ───

SMALL_VALUES = {  # a list item → how the proxy before round 3 took bodies of it
    "one-key objects": b'{"a":1},',  # parsing takes over MAX_EXPANSION times their size: refused before, too
    "short messages": b'{"role": "user", "content": "ok"},',  # under it: 3 parsed at once, 1.4 GB at the peak
}


def small_values(size, item):
    """`size` bytes of a completion request whose list `x` is made of `item` over and over."""
    head = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "x": ['
    return head + item * ((size - len(head) - 4) // len(item)) + b"1]}"


@pytest.mark.load
@pytest.mark.parametrize("shape", list(SMALL_VALUES))
@pytest.mark.parametrize("path", [CHAT, COUNT, RESPONSES])
async def test_eight_31_mb_expanding_bodies_at_once_peak_under_700_mb(pair, path, shape):
    running = pair(LOG_LEVEL="WARNING")  # the defaults: MEMORY_BUDGET_MB 384, MAX_REQUEST_MB 32
    body = small_values(31 * k2proxy.MB, SMALL_VALUES[shape])
    headers = {"Authorization": f"Bearer {E2E_KEY}", "Content-Type": "application/json"}

    async def send(session):
        async with session.post(running.url + path, data=body, headers=headers) as response:
            return response.status

    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        statuses = await asyncio.gather(*(send(session) for _ in range(8)))
        async with session.get(running.url + "/v1/models", headers=headers) as after:
            assert after.status == 200, "the process still serves"
    peak_mb = peak_rss_kb(running.process.pid) / 1024
    print(f"\n8 x 31 MB of {shape} to {path}: statuses {sorted(statuses)}, peak RSS {peak_mb:.0f} MB, "
          f"{time.monotonic() - started:.1f} s")
    assert peak_mb < 700 and running.process.poll() is None
    assert set(statuses) <= {200, 413, 503, 529} and (shape == "short messages" or 200 not in statuses)


@pytest.mark.load
async def test_a_31_mb_body_within_every_limit_on_an_idle_process_is_not_told_to_try_again(pair):
    running = pair(LOG_LEVEL="WARNING")  # the defaults: MEMORY_BUDGET_MB 384, MAX_REQUEST_MB 32
    body = small_values(31 * k2proxy.MB, SMALL_VALUES["short messages"])
    assert k2proxy.expanded_size(body) < k2proxy.MAX_EXPANSION * len(body)
    headers = {"Authorization": f"Bearer {E2E_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for _ in range(2):  # as the answer says: try again
            async with session.post(running.url + CHAT, data=body, headers=headers) as response:
                answer = await response.text()
                assert response.status in (200, 413), f"{response.status} {answer}: no retry can ever be served"


@pytest.mark.load
async def test_another_key_is_served_while_a_limited_key_trickles_three_32_mb_uploads(pair, tmp_path):
    (tmp_path / "api_keys.txt").write_text(f"alice:{ALICE} concurrent=3\nbob:{BOB}\n")
    running = pair(LOG_LEVEL="WARNING")
    host, port = "127.0.0.1", running.port
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ALICE}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {32 * k2proxy.MB}\r\n\r\n{{").encode()
    connections = [await asyncio.open_connection(host, port) for _ in range(3)]
    trickled = [0, 0, 0]

    async def trickle(number, writer):
        writer.write(head)
        await writer.drain()
        for _ in range(60):  # a byte a second, for at most a minute
            await asyncio.sleep(1)
            writer.write(b" ")
            await writer.drain()
            trickled[number] += 1

    tricklers = [asyncio.ensure_future(trickle(n, writer)) for n, (_, writer) in enumerate(connections)]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session:
            async def alice_active():
                async with session.get(running.url + "/admin/keys", headers=as_key(E2E_KEY)) as listed:
                    return {key["name"]: key["active"] for key in (await listed.json())["keys"]}["alice"]

            deadline = time.monotonic() + 10
            while await alice_active() < 3 or min(trickled) < 2:  # the uploads hold their slots, and trickle on
                assert time.monotonic() < deadline, f"the uploads: {trickled} bytes trickled"
                await asyncio.sleep(0.05)
            started = time.monotonic()
            async with session.post(running.url + CHAT, json=chat(), headers=as_key(BOB)) as served:
                assert served.status == 200 and (await served.json())["choices"][0]["message"]["content"]
            served_in = time.monotonic() - started
            started = time.monotonic()
            async with session.post(running.url + CHAT, json=chat(), headers=as_key(ALICE)) as fourth:
                assert fourth.status == 429 and (await fourth.json())["error"]["code"] == "too_many_at_once"
            refused_in = time.monotonic() - started
            assert await alice_active() == 3 and not any(task.done() for task in tricklers), "still trickling"
    finally:
        for task in tricklers:
            task.cancel()
        for _, writer in connections:
            writer.close()
    print(f"\nanother key served in {served_in * 1000:.0f} ms, the limited key's 4th refused in "
          f"{refused_in * 1000:.0f} ms, while three 32 MB uploads trickled ({sum(trickled)} bytes so far)")
    assert served_in < 3 and refused_in < 3
