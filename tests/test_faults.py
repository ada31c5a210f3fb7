"""Fault injection: each upstream fault gets its documented result within the timeout, and charges the
token only when the token is to blame; an upstream that cannot be reached is asked once, named with what to run, and
turns /health degraded until it answers again."""

import asyncio
import logging
import time

import aiohttp
import pytest
from aiohttp import web
from conftest import AUTH, chat, free_port, read_sse, stream_text
from fake_api import ApiReply
from fake_site import Reply, make_jwt

import k2proxy

TOKEN = make_jwt(time.time() + 3600)
WORKING = make_jwt(time.time() + 3600, "working")  # another account's token, which answers
TIMEOUT = 0.5

FAULTS = {
    # name: (reply, expected HTTP status, expected error code or None, token charged while another token works)
    "slow first byte": (Reply(first_delay=3), 504, "upstream_timeout", True),
    "stall mid-stream": (Reply(reasoning="x" * 200, piece=5, hang_after=5), 200, "upstream_timeout", True),
    "drop mid-stream": (Reply(reasoning="x" * 200, piece=5, drop_after=5), 200, "upstream_error", True),
    "drop before content": (Reply(drop_after=0), 502, "upstream_error", True),
    "error frame": (Reply(reasoning="x" * 200, piece=5, error_after=5), 200, "upstream_error", True),
    "error body not JSON": (Reply(status=500, body="<html>Bad gateway</html>"), 502, "upstream_error", True),
    "expired session": (Reply(status=401, body="Unauthorized"), 502, "upstream_auth_failed", True),
    "redirect": (Reply(status=302, headers={"Location": "https://chat.ifm.ai/auth"}), 502, "upstream_error", False),
    "unknown model": (Reply(status=400, body='{"detail": "Model not found"}'), 404, "model_not_found", False),
    "html page": (Reply(content_type="text/html"), 502, "upstream_blocked", False),
    "frame over 16 MB": (Reply(answer="y" * (17 * 1024 * 1024), piece=17 * 1024 * 1024, style="incremental",
                               markup="plain", usage=None), 502, "upstream_error", False),
    "garbage frames": (Reply(garbage=True, noise=True), 200, None, False),
    "huge frame": (Reply(answer="z" * 2_000_000, piece=2_000_000, style="incremental"), 200, None, False),
}


@pytest.fixture
async def one_token_proxy(make_proxy, tmp_path):
    """A proxy whose next request goes to TOKEN, with no retry, after another token (WORKING) has answered one."""
    (tmp_path / "tokens.txt").write_text(f"{WORKING}\n{TOKEN}\n")
    return await make_proxy(PROXY_MODE="user", REQUEST_TIMEOUT=TIMEOUT, MAX_RETRIES=0)


@pytest.mark.parametrize("fault", FAULTS)
async def test_fault_gets_its_documented_result(one_token_proxy, fake, fault):
    reply, status, code, charged = FAULTS[fault]
    fake.by_token[WORKING] = Reply()
    assert (await one_token_proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    fake.reply = reply
    started = time.monotonic()

    async def run():
        response = await one_token_proxy.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
        if response.status != 200:
            return response.status, (await response.json())["error"], None
        events, _ = await read_sse(response)
        assert events[-1] == "[DONE]"
        error = events[-2].get("error")
        return 200, error, events
    got_status, error, events = await asyncio.wait_for(run(), TIMEOUT + 10)
    assert got_status == status
    assert (error or {}).get("code") == code
    if code is None:
        assert stream_text(events[:-1]) == reply.answer
    assert time.monotonic() - started < 8
    token = one_token_proxy.server.app[k2proxy.STATE].site.pool.credentials[1]
    assert [r.token for r in fake.received] == [WORKING, TOKEN]
    assert token.failures == (1 if charged else 0), token.last_error


async def test_refused_connection_is_a_quick_502_and_not_charged(make_proxy, tmp_path):
    (tmp_path / "tokens.txt").write_text(TOKEN + "\n")
    proxy = await make_proxy(PROXY_MODE="user", K2THINK_BASE_URL=f"http://127.0.0.1:{free_port()}", MAX_RETRIES=1)
    for stream in (False, True):
        response = await proxy.post("/v1/chat/completions", json=chat(stream=stream), headers=AUTH)
        assert response.status == 502 and "cannot reach upstream" in (await response.json())["error"]["message"]
    assert proxy.server.app[k2proxy.STATE].site.pool.credentials[0].failures == 0


@pytest.fixture
def closed_port():
    """A loopback port nothing listens on: connections to it are refused."""
    return free_port()


async def test_an_unreachable_site_names_its_host_and_the_check_and_is_asked_once(make_proxy, closed_port, caplog):
    proxy = await make_proxy(K2THINK_BASE_URL=f"http://127.0.0.1:{closed_port}")
    caplog.set_level(logging.INFO, logger="k2proxy")
    response = await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    error = (await response.json())["error"]
    assert response.status == 502 and error["code"] == "upstream_unreachable"
    assert f"127.0.0.1:{closed_port}" in error["message"] and "python k2proxy.py --check" in error["message"]
    assert caplog.text.count("upstream attempt") == 1, "a refused connection is not tried again on the same endpoint"


async def test_health_turns_degraded_after_connection_failures_in_a_row(make_proxy, closed_port):
    proxy = await make_proxy(K2THINK_BASE_URL=f"http://127.0.0.1:{closed_port}")
    assert (await proxy.get("/health")).status == 200
    for _ in range(k2proxy.UNREACHABLE_DEGRADED):
        await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    response = await proxy.get("/health")
    body = await response.json()
    assert response.status == 503 and body["status"] == "degraded"
    assert f"127.0.0.1:{closed_port}" in body["reason"] and "--check" in body["reason"]


async def test_health_is_ok_again_once_upstream_answers(make_proxy, fake):
    proxy = await make_proxy()
    state = proxy.server.app[k2proxy.STATE]
    state.http.unreachable, state.http.unreachable_host = k2proxy.UNREACHABLE_DEGRADED, "gone.example"
    assert (await proxy.get("/health")).status == 503
    assert (await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    assert (await proxy.get("/health")).status == 200


async def test_an_answer_read_slowly_keeps_its_end_when_upstream_tears_the_connection_down(aiohttp_server):
    """The site tears its connection down after an answer's end; aiohttp then raises before the bytes it still
    holds, so a reader slower than the network (a WebSocket, a slow client) lost the end: the proxy reads ahead."""
    first_read, torn_down = asyncio.Event(), asyncio.Event()

    async def ragged(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await first_read.wait()  # the reader is at work: the rest arrives while its consumer is busy elsewhere
        await response.write(b"data: two\n\ndata: the end\n\n")
        request.transport.close()  # the chunked body never ends
        torn_down.set()
        return response

    app = web.Application()
    app.router.add_get("/", ragged)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/")) as response:  # aiohttp's own reads
            assert await asyncio.wait_for(response.content.readany(), 5) == b"data: one\n\n"
            first_read.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(response.content.wait_eof(), 5)  # the connection is lost
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.content.readany()  # and the bytes aiohttp held with it
        first_read.clear()
        torn_down.clear()
        async with session.get(server.make_url("/")) as response:
            chunks = k2proxy.arrived_chunks(response)
            got = [await asyncio.wait_for(anext(chunks), 5)]
            first_read.set()
            await asyncio.wait_for(torn_down.wait(), 5)
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in chunks:
                    got.append(chunk)
    assert b"".join(got) == b"data: one\n\ndata: two\n\ndata: the end\n\n"


@pytest.mark.parametrize("header", ["x-ratelimit-remaining-tokens-daily", "Retry-After"])
async def test_a_number_longer_than_python_reads_from_upstream_is_ignored_not_a_500(api_proxy, fake_api, header):
    fake_api.reply = ApiReply(answer="Fine.", headers={header: "9" * 5000})
    proxy = await api_proxy()
    response = await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    assert response.status == 200 and (await response.json())["choices"][0]["message"]["content"] == "Fine."
