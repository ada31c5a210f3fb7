"""Client connections of a proxy run as a process (`python k2proxy.py`): a deadline for the first request's headers,
idle keep-alive connections closed (sooner without a key), a cap on open connections at which idle ones make room,
descriptors running out reported once, malformed HTTP answered without echoing it, and SIGTERM's drain. All on
loopback, each bounded to a few seconds."""

import asyncio
import json
import resource
import signal
import socket
import time

import aiohttp
import pytest
from conftest import API_KEY, E2E_KEY, MODEL, ROOT, free_port, until

import k2proxy

KEY = f"Authorization: Bearer {API_KEY}\r\n".encode()


@pytest.fixture
def start(spawn, tmp_path):
    """A proxy process with these settings; its port."""
    def run(limit_files=None, **env):
        port = free_port()
        settings = {"PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": API_KEY, "LOG_LEVEL": "INFO",
                    **{key: str(value) for key, value in env.items()}}
        preexec = ((lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit_files, limit_files)))
                   if limit_files else None)
        return port, spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path, env=settings, preexec_fn=preexec)
    return run


async def get_models(port):
    """One ordinary request on a fresh connection; its status line."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + KEY + b"Connection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer.split(b"\r\n", 1)[0]


async def until_served(port, seconds=5):
    """Asks until a request is served: a refused one may be a 503, or a reset when the refusal meets its bytes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if await get_models(port) == b"HTTP/1.1 200 OK":
                return
        except ConnectionResetError:
            pass
        await asyncio.sleep(0.02)
    pytest.fail(f"no request served within {seconds} s")


async def held_open(port, key=None):
    """A connection the proxy has accepted and keeps: one request answered (with `key`, by a route that checks it, so
    that the connection has shown a valid key; else GET /health), the connection kept alive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer {key}\r\n" if key else "GET /health HTTP/1.1\r\n"
    writer.write(request.encode() + b"Host: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
    return reader, writer


async def closed_by_the_proxy(reader, seconds):
    """Whether the proxy ends the connection within `seconds`."""
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except asyncio.TimeoutError:
        return False


@pytest.mark.load
async def test_slowloris_connections_are_closed_at_the_header_deadline_while_others_are_served(start):
    port, _ = start(HEADER_TIMEOUT=1)
    sockets = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
    for _, writer in sockets:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")  # never finished
    started = time.monotonic()
    assert await get_models(port) == b"HTTP/1.1 200 OK", "served while 200 sockets dribble"
    closed = await asyncio.gather(*(closed_by_the_proxy(reader, 5) for reader, _ in sockets))
    assert all(closed) and time.monotonic() - started < 4
    for _, writer in sockets:
        writer.close()


@pytest.mark.load
async def test_idle_keep_alive_connections_are_closed(start):
    port, _ = start(IDLE_TIMEOUT=1)
    reader, writer = await held_open(port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # a second request that never ends
    assert await closed_by_the_proxy(reader, 5)
    writer.close()


async def busy(port):
    """A connection with a request under way: a keyed upload whose handler has asked for its body (100 Continue)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + KEY + b"Expect: 100-continue\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 100")
    return reader, writer


async def test_connections_beyond_the_cap_are_refused_at_once_when_all_are_busy(start):
    port, _ = start(MAX_CONNECTIONS=5, HEADER_TIMEOUT=30)
    held = [await busy(port) for _ in range(5)]
    reader, _writer = await asyncio.open_connection("127.0.0.1", port)
    answer = await asyncio.wait_for(reader.read(), 5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    assert json.loads(body)["error"]["code"] == "too_many_connections"
    for _, held_writer in held:
        held_writer.close()
    await until_served(port)


async def test_idle_sockets_at_the_cap_make_room_for_clients_with_a_key(start):
    port, _ = start(MAX_CONNECTIONS=20, HEADER_TIMEOUT=30)
    idle = [await held_open(port) for _ in range(20)]  # keyless keep-alive sockets, one GET /health each
    statuses = [await get_models(port) for _ in range(10)]
    assert statuses == [b"HTTP/1.1 200 OK"] * 10, "a client with a key is served while idle sockets fill the cap"
    closed = await asyncio.gather(*(closed_by_the_proxy(reader, 5) for reader, _ in idle[:10]))
    assert all(closed), "the ten that waited longest made room"
    for _, writer in idle:
        writer.close()


async def test_a_connection_that_showed_no_key_is_closed_soon_once_idle_and_a_keyed_one_stays(start):
    port, _ = start()  # IDLE_TIMEOUT 75
    keyless_reader, keyless_writer = await held_open(port)
    keyed_reader, keyed_writer = await held_open(port, API_KEY)
    assert await closed_by_the_proxy(keyless_reader, k2proxy.KEYLESS_IDLE_SECONDS + 3)
    keyed_writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + KEY + b"\r\n")
    head = await asyncio.wait_for(keyed_reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), "the keyed connection is still open and serves"
    for writer in (keyless_writer, keyed_writer):
        writer.close()


@pytest.mark.load
async def test_running_out_of_descriptors_is_logged_once_and_survived(start):
    port, proxy = start(limit_files=64, MAX_CONNECTIONS=1000, HEADER_TIMEOUT=30)
    sockets = []
    for _ in range(120):
        sockets.append(socket.create_connection(("127.0.0.1", port)))
    await asyncio.sleep(2.5)  # the proxy tries to accept them for a while
    for sock in sockets:
        sock.close()
    await until_served(port)  # asyncio retries accepting a second after running out
    proxy.terminate()
    log = proxy.communicate(timeout=10)[1]
    assert log.count("out of file descriptors") == 1 and "Traceback" not in log, log[-2000:]


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"ZQXMARK" * 150_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"ZQXMARK" * 15_000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: ZQXMARK\r\n" % n for n in range(10_000)) + b"\r\n",
    b"ZQXMARK GARBAGE\r\n\r\n",
], ids=["1 MB request line", "100 KB header", "10,000 headers", "not HTTP"])
async def test_malformed_http_is_answered_without_echoing_it(start, request_bytes):
    port, _ = start()
    answer = await asyncio.to_thread(send_and_read, port, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head[:12] in (b"HTTP/1.0 400", b"HTTP/1.1 400") and b"application/json" in head, answer[:300]
    error = json.loads(body)["error"]
    assert error["code"] == "malformed_request" and error["message"].startswith("Malformed HTTP request")
    assert b"ZQXMARK" not in answer
    assert await get_models(port) == b"HTTP/1.1 200 OK"


def send_and_read(port, data, seconds=10):
    """Sends what the proxy takes of `data`, then reads the answer to the end of the connection, within `seconds`."""
    deadline = time.monotonic() + seconds
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the proxy answered, and hung up, before taking all of it
        parts = []
        while time.monotonic() < deadline:
            try:
                part = sock.recv(65536)
            except OSError:
                part = b""  # a reset once the answer is sent ends it too
            if not part:
                return b"".join(parts)
            parts.append(part)
        pytest.fail(f"the connection did not end within {seconds} s")


# ─── SIGTERM: stop accepting, let what is in flight finish within SHUTDOWN_GRACE, then end the rest ───

SLOW_ANSWER = {"reasoning": "x" * 300, "answer": "all of it", "piece": 5, "delay": 0.03}  # about 2 s


async def first_data_then_rest(response, started):
    """A stream's data lines, once the first has arrived (`started` is set then)."""
    lines = []
    async for raw in response.content:
        if raw.startswith(b"data: "):
            lines.append(raw[6:].strip().decode())
            started.set()
    return lines


async def refused(port, seconds=5):
    """Whether new connections are refused within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        except ConnectionRefusedError:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_connections(pair):
    started = pair(SHUTDOWN_GRACE=15)
    started.steer(**SLOW_ANSWER)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {E2E_KEY}"}) as session:
        idle_reader, idle_writer = await held_open(started.port, E2E_KEY)
        streaming = await session.post(started.url + "/v1/chat/completions", json={**body, "stream": True})
        first = asyncio.Event()
        stream = asyncio.ensure_future(first_data_then_rest(streaming, first))
        whole = asyncio.ensure_future(session.post(started.url + "/v1/chat/completions", json=body))
        await asyncio.wait_for(first.wait(), 10)
        await until(lambda: len(started.received()) == 2, 10)
        started.process.send_signal(signal.SIGTERM)

        assert await refused(started.port), "new connections are refused once SIGTERM came"
        assert await closed_by_the_proxy(idle_reader, 5), "an idle keep-alive connection is closed at once"
        idle_writer.close()
        lines = await asyncio.wait_for(stream, 15)
        answer = await asyncio.wait_for(whole, 15)
        assert answer.status == 200, await answer.text()
        message = (await answer.json())["choices"][0]
    assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] == "stop"
    assert "".join(json.loads(line)["choices"][0]["delta"].get("content") or "" for line in lines[:-1]
                   if json.loads(line)["choices"]) == "all of it"
    assert message["message"]["content"] == "all of it" and message["finish_reason"] == "stop"
    assert await asyncio.to_thread(started.process.wait, 10) == 0
    log = started.process.stderr.read()
    assert "2 requests in flight get 15 s to finish" in log and "still running" not in log


async def test_a_stream_longer_than_the_grace_ends_with_its_error_event(pair):
    started = pair(SHUTDOWN_GRACE=1)
    started.steer(reasoning="x" * 2000, answer="never", piece=5, delay=0.05)  # 20 s
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {E2E_KEY}"}) as session:
        response = await session.post(started.url + "/v1/chat/completions", json={
            "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        first = asyncio.Event()
        stream = asyncio.ensure_future(first_data_then_rest(response, first))
        await asyncio.wait_for(first.wait(), 10)
        started.process.send_signal(signal.SIGTERM)
        lines = await asyncio.wait_for(stream, 1 + k2proxy.SHUTDOWN_SECONDS + 2)
    assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["code"] == "shutting_down"
    assert await asyncio.to_thread(started.process.wait, 10) == 0
    assert "1 requests still running end now" in started.process.stderr.read()


async def test_sigterm_lets_a_websocket_finish_its_response_then_closes_it_as_going_away(pair):
    started = pair(SHUTDOWN_GRACE=15)
    started.steer(**SLOW_ANSWER)
    async with (aiohttp.ClientSession(headers={"Authorization": f"Bearer {E2E_KEY}"}) as session,
                session.ws_connect(started.url.replace("http", "ws") + "/v1/responses") as ws):
        await ws.send_json({"type": "response.create", "model": MODEL, "input": "hi"})
        events = [await asyncio.wait_for(ws.receive_json(), 10)]
        started.process.send_signal(signal.SIGTERM)
        while events[-1]["type"] not in ("response.completed", "response.failed", "error"):
            events.append(await asyncio.wait_for(ws.receive_json(), 15))
        closing = await asyncio.wait_for(ws.receive(), 5)
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][-1]["content"][0]["text"] == "all of it"
    assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == aiohttp.WSCloseCode.GOING_AWAY
    assert await asyncio.to_thread(started.process.wait, 10) == 0
