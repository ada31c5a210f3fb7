"""Limits that keep one client from taking the proxy down: the memory budget for bodies, bodies built to expand,
JSON nested too deeply, bodies sent without a key, the answer kept for a non-streamed response, and the overall
deadline of a completion."""

import asyncio
import json

import pytest
from conftest import AUTH, chat, read_sse
from fake_upstream import Reply

import k2proxy


def expanding(size):
    """A body of `size` bytes whose JSON is millions of empty objects."""
    head, tail = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": [', b"{}]}"
    return head + b"{}," * ((size - len(head) - len(tail)) // 3) + tail


async def post_raw(proxy, data, path="/v1/chat/completions", headers=AUTH):
    return await proxy.post(path, data=data, headers={**headers, "Content-Type": "application/json"})


@pytest.mark.parametrize("path,shape", [("/v1/chat/completions", "error"), ("/v1/messages", "type"),
                                        ("/v1/responses", "error")])
async def test_a_body_built_to_expand_is_refused_before_it_is_parsed(make_proxy, fake, monkeypatch, path, shape):
    proxy = await make_proxy(MAX_REQUEST_MB="4")
    parsed = []
    monkeypatch.setattr(k2proxy, "parse_body", lambda *args, **kwargs: parsed.append(1))
    response = await post_raw(proxy, expanding(3 * k2proxy.MB), path)
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
    while not budget.waiting:
        await asyncio.sleep(0.01)
    budget.release(budget.limit)
    assert (await waiting).status == 200 and budget.used == 0


def test_the_budget_admits_what_fits_and_wakes_waiters_in_order():
    async def run():
        budget = k2proxy.MemoryBudget(1 / k2proxy.MB * 100)  # 100 bytes
        await budget.admit(60)
        first = asyncio.ensure_future(budget.admit(50))
        second = asyncio.ensure_future(budget.admit(30))
        await asyncio.sleep(0)
        assert budget.used == 90 and second.done() and not first.done(), "what fits goes first"
        budget.release(60)
        await first
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
    fake.reply = Reply(reasoning="thinking " * 10_000, piece=5, delay=0.01, style="incremental")
    response = await asyncio.wait_for(proxy.post("/v1/chat/completions", json=chat(stream=stream), headers=AUTH), 10)
    if stream:
        events, _ = await read_sse(response)
        assert events[-2]["error"]["code"] == "upstream_timeout"
        assert "COMPLETION_TIMEOUT" in events[-2]["error"]["message"]
    else:
        assert response.status == 504 and (await response.json())["error"]["code"] == "upstream_timeout"
    await asyncio.wait_for(fake.client_gone.wait(), 5)
