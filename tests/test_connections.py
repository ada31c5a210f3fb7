"""Client connections of a proxy run as a process (`python k2proxy.py`): a deadline for the first request's headers,
idle keep-alive connections closed, a cap on open connections, descriptors running out reported once, and malformed
HTTP answered without echoing it. All on loopback, each bounded to a few seconds."""

import asyncio
import json
import resource
import socket
import time

import pytest
from conftest import API_KEY, ROOT, free_port

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


async def held_open(port):
    """A connection the proxy has accepted and keeps: one request answered, the connection kept alive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
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


async def test_connections_beyond_the_cap_are_refused_at_once(start):
    port, _ = start(MAX_CONNECTIONS=5, HEADER_TIMEOUT=30)
    held = [await held_open(port) for _ in range(5)]
    reader, _writer = await asyncio.open_connection("127.0.0.1", port)
    answer = await asyncio.wait_for(reader.read(), 5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    assert json.loads(body)["error"]["code"] == "too_many_connections"
    for _, held_writer in held:
        held_writer.close()
    await until_served(port)


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
