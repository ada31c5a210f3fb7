"""Fuzzing the HTTP surface: whatever arrives, the answer is a JSON error or a valid answer, never a 500."""

import asyncio
import base64
import gzip
import json
import random

import pytest
from conftest import ADMIN, AUTH, MODEL, chat

ROUTES = ["/", "/health", "/v1/chat/completions", "/v1/models", "/v1/models/IFM/K2-Horizon-375B-A23B", "/v1/models/x",
          "/admin", "/admin/status", "/admin/tokens/stats", "/admin/tokens/content", "/admin/tokens/reset/0",
          "/admin/tokens/reset/-1", "/admin/tokens/reset-all", "/admin/tokens/reload", "/admin/tokens/update",
          "/admin/switch_mode", "/v1", "/v2/chat", "/admin/../k2proxy.py", "/%2e%2e/k2proxy.py", "/admin%00",
          "/v1/chat/completions/extra", "/" + "a" * 3000, "/v1/models/" + "名" * 50, "/admin/tokens/reset/99999999999"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
FIELDS = ["model", "messages", "stream", "temperature", "top_p", "max_tokens", "stop", "n", "tools", "tool_choice",
          "stream_options", "mode", "tokens", "content"]


def random_value(rng, depth=0):
    makers = [lambda: None, lambda: True, lambda: rng.randint(-2**40, 2**40), lambda: rng.random() * 1e6 - 5e5,
              lambda: "", lambda: "x" * rng.randrange(50),
              lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(4))],
              lambda: {rng.choice(FIELDS + ["role", "type", "url", "function"]): random_value(rng, depth + 1)
                       for _ in range(rng.randrange(4))},
              lambda: {"role": rng.choice(["user", "tool", "assistant", "x"]),
                       "content": random_value(rng, depth + 1)}]
    return makers[rng.randrange(9 if depth < 3 else 6)]()


def random_body(rng):
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if kind == 1:
        return json.dumps(random_value(rng)).encode()
    body = chat(stream=rng.random() < 0.5)
    for _ in range(rng.randrange(1, 4)):
        body[rng.choice(FIELDS)] = random_value(rng)
    data = json.dumps(body).encode()
    if kind == 2 and data:
        cut = rng.randrange(len(data))
        data = data[:cut] + bytes([rng.randrange(256)]) + data[cut + 1:]
    return data


def random_headers(rng):
    headers = {}
    auth = rng.randrange(5)
    if auth:
        headers.update([AUTH, ADMIN, {"Authorization": "Bearer " + "z" * rng.randrange(300)},
                        {"Authorization": "Basic Zm9vOmJhcg=="}][auth - 1])
    if rng.random() < 0.7:
        headers["Content-Type"] = rng.choice(["application/json", "text/plain", "multipart/form-data; boundary=x",
                                              "application/json; charset=latin-1", "application/x-www-form-urlencoded"])
    if rng.random() < 0.3:
        headers["Origin"] = rng.choice(["https://a.example", "null", "http://localhost:3000"])
    if rng.random() < 0.2:
        headers["Accept-Encoding"] = rng.choice(["gzip", "br", "identity", "*"])
    return headers


async def test_random_requests_never_get_a_500(proxy, fake):
    rng = random.Random(20261124)
    seen = set()
    for _ in range(600):
        method, path = rng.choice(METHODS), rng.choice(ROUTES)
        response = await proxy.request(method, path, data=random_body(rng), headers=random_headers(rng))
        text = await response.text(errors="replace")
        seen.add(response.status)
        assert response.status < 500 or response.status in (502, 503, 504), (method, path, response.status, text)
        assert "Traceback" not in text and 'File "' not in text
        if response.status >= 400:
            error = json.loads(text)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        if path.startswith("/admin/..") or "%2e" in path:
            assert "def main" not in text
    assert {200, 400, 401, 404, 405} <= seen
    assert (await proxy.get("/health")).status == 200


async def test_malformed_http_leaves_the_server_serving(proxy):
    port = proxy.server.port
    for raw in [b"GARBAGE\r\n\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n", b"\x00\x01\x02\x03" * 100,
                b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n"]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 5)
        assert answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.0 400") or answer == b""
        assert b"Traceback" not in answer
        writer.close()
    assert (await proxy.get("/health")).status == 200


async def test_header_bytes_that_are_not_utf8_get_a_401(proxy):
    port = proxy.server.port
    for path, code in ((b"/v1/models", "invalid_api_key"), (b"/admin/status", "invalid_admin_key")):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xe4\r\n"
                     b"Connection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401"), answer[:200]
        assert json.loads(body)["error"]["code"] == code


async def test_compressed_bodies_are_refused_before_they_are_unpacked(proxy, fake):
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))
    for encoding, data in (("gzip", bomb), ("gzip", json.dumps(chat()).encode()), ("deflate", b"x"), ("br", b"x")):
        response = await proxy.post("/v1/chat/completions", data=data,
                                    headers={**AUTH, "Content-Encoding": encoding, "Content-Type": "application/json"})
        error = (await response.json())["error"]
        assert response.status == 415 and error["code"] == "unsupported_content_encoding"
        assert encoding in error["message"]
    assert not fake.received


PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8).decode()
SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "enum": ["x"], "description": "d"}},
          "required": ["a"]}
VALID = {  # (path, a valid request using most fields, the error shape's top-level keys)
    "chat completions": ("/v1/chat/completions", {
        "model": MODEL, "stream": False, "temperature": 0.5, "top_p": 0.9, "max_tokens": 10, "stop": ["x"],
        "stream_options": {"include_usage": True}, "reasoning_effort": "low",
        "messages": [{"role": "system", "content": "s"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                  {"type": "image_url", "image_url": {"url": PNG}}]},
                     {"role": "assistant", "content": "ok", "tool_calls": [
                         {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "call_1", "name": "f", "content": "r"}],
        "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": SCHEMA}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}}}, {"error"}),
    "messages": ("/v1/messages", {
        "model": "claude-x", "max_tokens": 10, "stream": False, "temperature": 0.5, "top_p": 0.9,
        "stop_sequences": ["x"], "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
        "thinking": {"type": "enabled", "budget_tokens": 2000, "display": "summarized"},
        "output_config": {"effort": "low"}, "metadata": {"user_id": "u"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "source": {
                         "type": "base64", "media_type": "image/png", "data": PNG.split(",")[1]}},
                         {"type": "document", "title": "t.md", "source": {"type": "text", "media_type": "text/plain",
                                                                         "data": "doc"}}]},
                     {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                                       {"type": "text", "text": "ok"},
                                                       {"type": "tool_use", "id": "toolu_1", "name": "f",
                                                        "input": {}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": False,
                                                   "content": [{"type": "text", "text": "r"}]}]}],
        "tools": [{"name": "f", "description": "d", "input_schema": SCHEMA}],
        "tool_choice": {"type": "tool", "name": "f"}}, {"type", "error"}),
    "count_tokens": ("/v1/messages/count_tokens", {
        "model": "claude-x", "system": "s", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "f", "input_schema": SCHEMA}]}, {"type", "error"}),
    "responses": ("/v1/responses", {
        "model": MODEL, "stream": False, "store": False, "instructions": "i", "temperature": 0.5, "top_p": 0.9,
        "max_output_tokens": 10, "reasoning": {"effort": "low", "summary": "auto"}, "parallel_tool_calls": True,
        "input": [{"type": "message", "role": "user", "content": [
                      {"type": "input_text", "text": "hi"}, {"type": "input_image", "image_url": PNG},
                      {"type": "input_file", "filename": "a.txt", "file_data": "data:text/plain;base64,aGk="}]},
                  {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
                  {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "r"}],
        "tools": [{"type": "function", "name": "f", "description": "d", "parameters": SCHEMA},
                  {"type": "namespace", "name": "n",
                   "tools": [{"type": "function", "name": "g", "parameters": SCHEMA}]},
                  {"type": "web_search"}],
        "tool_choice": {"type": "function", "name": "f"}}, {"error"}),
}
WRONG = [None, True, 0, -1, 2.5, "", "x", [], [1], {}, {"a": 1}, [[]]]


def kind(value):
    return type(value) if not isinstance(value, bool) else bool


def paths(value, prefix=()):
    """Every place in a JSON value, its root excluded."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from paths(child, prefix + (key,))


def replaced(value, path, new):
    copy = json.loads(json.dumps(value))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return copy


@pytest.mark.parametrize("dialect", VALID)
async def test_every_field_of_every_dialect_with_a_wrong_type_is_a_4xx_in_its_shape(make_proxy, fake, dialect):
    proxy = await make_proxy(IMAGES="forward")  # images in the request, so that their fields are fuzzed too
    path, request, shape = VALID[dialect]
    assert (await proxy.post(path, json=request, headers=AUTH)).status == 200, "the request starts out valid"
    tried = 0
    for place in paths(request):
        original = request
        for key in place:
            original = original[key]
        for wrong in WRONG:
            if kind(wrong) is kind(original):
                continue
            response = await proxy.post(path, json=replaced(request, place, wrong), headers=AUTH)
            body = await response.json()
            tried += 1
            assert response.status < 500, (dialect, place, wrong, body)
            if response.status >= 400:
                assert set(body) == shape and body["error"]["message"], (dialect, place, wrong, body)
    assert tried > 50
