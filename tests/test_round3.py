"""Hardening, round 3: what a limited key, a hostile client or a hostile upstream could do, and what they get now."""

import asyncio
import json
import logging
import os
import stat
import time

import aiohttp
import pytest
from conftest import ADMIN, API_KEY, AUTH, MODEL, ROOT, chat, free_port, read_sse, until
from fake_upstream import Reply, make_jwt
from test_load import peak_rss_kb

import k2proxy

ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"


@pytest.fixture
async def keyed(make_proxy, tmp_path):
    """A proxy whose named keys are alice (limited as a test asks) and bob (no limits)."""
    async def start(alice_limits="", **env):
        (tmp_path / "api_keys.txt").write_text(f"alice:{ALICE} {alice_limits}\nbob:{BOB}\n")
        return await make_proxy(API_KEYS_FILE=tmp_path / "api_keys.txt", **env)
    return start


def as_key(key):
    return {"Authorization": f"Bearer {key}"}


# ─── Limits that count from the headers on, and for more than completions ───

async def test_an_upload_under_way_holds_its_keys_concurrent_slot(keyed, fake):
    proxy = await keyed("concurrent=1")
    url = proxy.make_url("/v1/chat/completions")
    release = asyncio.Event()

    async def trickle():
        yield b'{"model": "' + MODEL.encode() + b'", '
        await release.wait()
        yield b'"messages": [{"role": "user", "content": "hi"}]}'

    async with aiohttp.ClientSession() as session:
        upload = asyncio.ensure_future(session.post(url, data=trickle(), headers=as_key(ALICE)))
        await until(lambda: k2proxy_state(proxy).keys.named[0].active == 1)
        second = await proxy.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}]}, headers=as_key(ALICE))
        assert second.status == 429 and "at once" in (await second.json())["error"]["message"]
        assert (await proxy.post("/v1/chat/completions", json=chat(), headers=as_key(BOB))).status == 200
        release.set()
        assert (await upload).status == 200


def k2proxy_state(proxy):
    return proxy.server.app[k2proxy.STATE]


async def test_token_counts_and_stored_response_reads_count_against_rpm(keyed, fake):
    proxy = await keyed("rpm=2")
    count = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    statuses = [(await proxy.post("/v1/messages/count_tokens", json=count, headers=as_key(ALICE))).status
                for _ in range(2)]
    third = await proxy.get("/v1/responses/resp_nothing", headers=as_key(ALICE))
    assert statuses == [200, 200] and third.status == 429


# ─── Stored responses belong to the key that stored them ─────────────────────

async def test_another_keys_stored_response_is_a_404_and_its_id_stays_out_of_the_log(keyed, fake, caplog):
    proxy = await keyed()
    caplog.set_level(logging.INFO, logger="k2proxy")
    stored = await (await proxy.post("/v1/responses", json={"model": MODEL, "input": "Hi"},
                                     headers=as_key(ALICE))).json()
    response_id = stored["id"]
    for method, path, body in (("GET", f"/v1/responses/{response_id}", None),
                               ("DELETE", f"/v1/responses/{response_id}", None),
                               ("POST", "/v1/responses", {"model": MODEL, "input": "More",
                                                          "previous_response_id": response_id})):
        response = await proxy.request(method, path, json=body, headers=as_key(BOB))
        assert response.status == 404, (method, path)
    assert (await proxy.get(f"/v1/responses/{response_id}", headers=as_key(ALICE))).status == 200
    assert response_id not in caplog.text and "/v1/responses/{id}" in caplog.text


# ─── Streams that always end; text that always encodes ───────────────────────

async def test_an_answer_nested_too_deeply_for_json_ends_the_stream_with_its_error(proxy, fake):
    fake.reply = Reply(answer="[" * 5000 + "]" * 5000)
    body = chat(stream=True, response_format={"type": "json_object"})
    events, _ = await read_sse(await proxy.post("/v1/chat/completions", json=body, headers=AUTH))
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "invalid_json_output"


async def test_an_emoji_cut_between_two_frames_reaches_the_client_whole(proxy, fake):
    frames = ['{"content": "A \\ud83d"}', '{"content": "A \\ud83d\\ude00 B"}',
              '{"choices": [{"delta": {}, "finish_reason": "stop"}]}', '{"done": true}']
    fake.reply = Reply(body="".join(f"data: {frame}\n\n" for frame in frames), content_type="text/event-stream")
    events, _ = await read_sse(await proxy.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict)
                   and e.get("choices"))
    assert text == "A \U0001f600 B" and events[-1] == "[DONE]"


async def test_hidden_reasoning_counts_against_max_answer_mb(make_proxy, fake):
    proxy = await make_proxy(MAX_ANSWER_MB="0.001")
    fake.reply = Reply(reasoning="r" * 5000, answer="short")
    response = await proxy.post("/v1/chat/completions", json=chat(model=MODEL + "-nothink"), headers=AUTH)
    assert response.status == 502 and (await response.json())["error"]["code"] == "upstream_answer_too_large"


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


async def test_nan_in_a_request_body_is_a_400(proxy, fake):
    body = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    response = await proxy.post("/v1/chat/completions", data=body,
                                headers={**AUTH, "Content-Type": "application/json"})
    assert response.status == 400 and "NaN" in (await response.json())["error"]["message"]
    assert fake.received == []


# ─── What upstream says, and what clients send, as the log and clients see it ─

async def test_an_upstream_that_echoes_the_token_hands_it_to_nobody(make_proxy, fake, tmp_path, caplog):
    token = make_jwt(time.time() + 3600)
    (tmp_path / "tokens.txt").write_text(token + "\n")
    proxy = await make_proxy(PROXY_MODE="user")
    caplog.set_level(logging.INFO, logger="k2proxy")
    fake.reply = Reply(status=401, body=json.dumps({"detail": f"Bad header: Authorization: Bearer {token}\n" * 3}))
    response = await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    text = await response.text()
    assert response.status in (502, 503) and token not in text and token not in caplog.text
    stats = await (await proxy.get("/admin/tokens/stats", headers=ADMIN)).text()
    assert token not in stats


async def test_control_characters_from_clients_cannot_forge_log_lines(proxy, fake, caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    await proxy.post("/v1/chat/completions", json=chat(model="m\nFORGED 200 OK"), headers=AUTH)
    await proxy.post("/v1/chat%0AFORGED", json=chat(), headers=AUTH)
    tools = [{"type": "web\nFORGED", "name": "x"}]
    await proxy.post("/v1/messages", json={"model": MODEL, "max_tokens": 10, "tools": tools,
                                           "messages": [{"role": "user", "content": "hi"}]}, headers=AUTH)
    assert not any(line.startswith("FORGED") for line in caplog.text.splitlines())
    assert "m\\nFORGED" in caplog.text


async def test_upstreams_retry_after_is_capped(make_proxy, fake, tmp_path):
    (tmp_path / "tokens.txt").write_text(make_jwt(time.time() + 3600) + "\n")
    proxy = await make_proxy(PROXY_MODE="user")
    fake.reply = Reply(status=429, body='{"detail": "slow down"}', headers={"Retry-After": "99999999999"})
    await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    token = k2proxy_state(proxy).site.pool.credentials[0]
    assert token.cooling_until <= time.time() + k2proxy.RETRY_AFTER_MAX + 1


# ─── Files ───────────────────────────────────────────────────────────────────

def test_a_line_appended_while_a_save_runs_is_kept(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("one\n")
    watched = k2proxy.WatchedFile(path)

    def replace_with_two(text):
        with path.open("a") as other_writer:  # another program appends while the save is under way
            other_writer.write("appended\n")
        return "two\n"

    written = watched.rewrite(replace_with_two)
    assert path.read_text() == written and written.splitlines() == ["two", "appended"]


async def test_saved_secret_files_are_0600_and_a_wider_mode_is_warned_of_once(make_proxy, tmp_path, caplog):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(make_jwt(time.time() + 3600) + "\n")
    os.chmod(tokens, 0o644)
    caplog.set_level(logging.WARNING, logger="k2proxy")
    proxy = await make_proxy(PROXY_MODE="user")
    await until(lambda: "others may read it" in caplog.text)
    body = await (await proxy.get("/admin/tokens/content", headers=ADMIN)).json()
    saved = await proxy.post("/admin/tokens/update", json={"content": body["content"], "version": body["version"]},
                             headers=ADMIN)
    assert saved.status == 200 and stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert caplog.text.count("others may read it") == 1


async def test_a_reload_keeps_each_named_keys_counts(keyed, fake, tmp_path):
    proxy = await keyed("rpm=2")
    for _ in range(2):
        assert (await proxy.post("/v1/chat/completions", json=chat(), headers=as_key(ALICE))).status == 200
    (tmp_path / "api_keys.txt").write_text(f"alice:{ALICE} rpm=2\nbob:{BOB} rpm=9\n")
    await until(lambda: k2proxy_state(proxy).keys.named[1].rpm == 9)
    assert (await proxy.post("/v1/chat/completions", json=chat(), headers=as_key(ALICE))).status == 429


# ─── Linear work and bounded collections ─────────────────────────────────────

def test_an_unclosed_summary_is_dropped_as_it_arrives():
    splitter = k2proxy.MarkupSplitter()
    splitter.feed('<details type="reasoning" done="false">\n<summary>')
    for _ in range(4000):
        splitter.feed("x" * 1024)
        assert len(splitter._pending) < len("</summary>"), "what waits for </summary> stays small"


async def test_tool_kinds_left_out_are_remembered_and_logged_up_to_a_bound(proxy, fake, caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    for number in range(k2proxy.TOOL_KINDS_NOTED + 10):
        tools = [{"type": f"server_tool_{number}_" + "y" * 500, "name": "x"}]
        await proxy.post("/v1/messages", json={"model": MODEL, "max_tokens": 10, "tools": tools,
                                               "messages": [{"role": "user", "content": "hi"}]}, headers=AUTH)
    assert len(k2proxy_state(proxy).tools_left_out) == k2proxy.TOOL_KINDS_NOTED
    assert caplog.text.count("are left out of the prompt") == k2proxy.TOOL_KINDS_NOTED
    assert "y" * (k2proxy.TOOL_KIND_CHARS + 1) not in caplog.text


# ─── The issue's figures, from a real process (load tests: run with --load) ──

def one_key_objects(size):
    """`size` bytes of small one-key objects, which parse to about twelve times their size."""
    head, tail = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], "x": [', b"]}"
    item = b'{"a":1},'
    return head + item * ((size - len(head) - len(tail)) // len(item)) + b'{"a":1}' + tail


def started_proxy(spawn, tmp_path, keys_file=""):
    """`python k2proxy.py` with its defaults (MEMORY_BUDGET_MB 384, MAX_REQUEST_MB 32) on a free port."""
    port = free_port()
    (tmp_path / "api_keys.txt").write_text(keys_file)
    process = spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path, env={
        "PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": API_KEY, "LOG_LEVEL": "WARNING",
        "K2THINK_BASE_URL": f"http://127.0.0.1:{free_port()}"})
    return process, f"http://127.0.0.1:{port}"


@pytest.mark.load
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages/count_tokens", "/v1/responses"])
async def test_eight_expanding_31_mb_bodies_keep_the_process_under_700_mb(spawn, tmp_path, path):
    process, base = started_proxy(spawn, tmp_path)
    body = one_key_objects(31 * k2proxy.MB)

    async def send(session):
        async with session.post(base + path, data=body, headers={**AUTH, "Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=120)) as response:
            return response.status

    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(send(session) for _ in range(8)))
    peak_mb = peak_rss_kb(process.pid) / 1024
    print(f"8 x 31 MB expanding bodies to {path}: {sorted(set(statuses))}, peak RSS {peak_mb:.0f} MB")
    assert all(400 <= status < 600 for status in statuses) and process.poll() is None
    assert peak_mb < 700, f"peak RSS {peak_mb:.0f} MB"


@pytest.mark.load
async def test_another_key_is_served_while_a_limited_key_trickles_three_32_mb_uploads(spawn, tmp_path):
    _, base = started_proxy(spawn, tmp_path, f"alice:{ALICE} concurrent=3\nbob:{BOB}\n")
    host, port = base.removeprefix("http://").split(":")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ALICE}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {32 * k2proxy.MB}\r\n\r\n{{").encode()
    tricklers = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
    try:
        for _, writer in tricklers:
            writer.write(head)
            await writer.drain()
        async with aiohttp.ClientSession() as session:
            count = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            started = time.monotonic()
            async with session.post(base + "/v1/messages/count_tokens", json=count, headers=as_key(BOB),
                                    timeout=aiohttp.ClientTimeout(total=3)) as served:
                assert served.status == 200
            took = time.monotonic() - started
            async with session.post(base + "/v1/messages/count_tokens", json=count, headers=as_key(ALICE),
                                    timeout=aiohttp.ClientTimeout(total=3)) as fourth:
                assert fourth.status == 429
        print(f"another key served in {took * 1000:.0f} ms while three 32 MB uploads trickle")
    finally:
        for _, writer in tricklers:
            writer.close()
