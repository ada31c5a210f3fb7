"""What the proxy tells of itself: /metrics (read with Prometheus's own parser), the request log (the admin page's
polling at DEBUG), the last hour, and named API keys with their limits: counted from a request's headers on, on every
/v1 route, and kept across edits of the keys file."""

import asyncio
import json
import logging
import time
from itertools import pairwise

import aiohttp
import pytest
from conftest import (
    ADMIN,
    ADMIN_KEY,
    ALICE,
    API_KEY,
    AUTH,
    BOB,
    CAROL,
    CHAT,
    COUNT,
    E2E_KEY,
    MODEL,
    RESPONSES,
    as_key,
    asked,
    chat,
    read_sse,
    state_of,
    until,
)
from fake_site import AUTH_EXPIRED, Reply, make_jwt
from prometheus_client.parser import text_string_to_metric_families

import k2proxy

TOKENS = [make_jwt(time.time() + 3600, name) for name in ("first", "second")]
KEYS_FILE = "# team keys\nalice:sk-alice-0123456789 rpm=5\nbob:sk-bob-0123456789 concurrent=2\nci:sk-ci-0123456789\n"


@pytest.fixture
async def monitored(make_proxy, fake, tmp_path):
    (tmp_path / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    (tmp_path / "api_keys.txt").write_text(KEYS_FILE)
    return await make_proxy(PROXY_MODE="user", API_KEYS_FILE=tmp_path / "api_keys.txt", REQUEST_TIMEOUT="0.5",
                            MAX_RETRIES=1)


async def traffic(proxy, fake):
    """One request of every kind: success, client error, upstream failure, timeout, failover, client gone."""
    fake.reply = Reply(answer="fine")
    assert (await proxy.post("/v1/chat/completions", json=chat("secret question"), headers=as_key(ALICE))).status == 200
    assert (await proxy.post("/v1/chat/completions", json=chat(model="gpt-4"), headers=AUTH)).status == 404
    fake.script = [Reply(status=500, body="down"), Reply(status=500, body="down")]
    assert (await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 502
    fake.script = [Reply(first_delay=3)]  # every token failed last: one probe, not a wait for each
    assert (await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 504
    fake.script = [Reply(status=401, body=json.dumps(AUTH_EXPIRED)), Reply(answer="after failover")]
    assert (await proxy.post("/v1/messages", json={"model": "claude-x", "max_tokens": 9, "messages": [
        {"role": "user", "content": "hi"}]}, headers=as_key(BOB))).status == 200
    fake.reply = Reply(reasoning="x" * 2000, piece=5, delay=0.02)
    response = await proxy.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    await response.content.readline()
    response.close()
    await until(lambda: proxy.server.app[k2proxy.STATE].monitor.in_flight == 0)


def samples(text):
    """{(name, labels as a sorted tuple): value} of a Prometheus exposition, read by the official parser."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_metrics_parse_and_count_what_the_traffic_did(monitored, fake):
    await traffic(monitored, fake)
    response = await monitored.get("/metrics", headers=ADMIN)
    assert response.status == 200 and response.content_type == "text/plain"
    found = samples(await response.text())
    chat_route = ("route", "/v1/chat/completions")

    def requests(outcome, status_class, key="(VALID_API_KEY)", route=chat_route):
        labels = tuple(sorted((route, ("status_class", status_class), ("outcome", outcome), ("key", key))))
        return found.get(("k2proxy_requests_total", labels), 0)
    assert requests("ok", "2xx", "alice") == 1 and requests("client_error", "4xx") == 1
    assert requests("upstream_failed", "5xx") == 1 and requests("timeout", "5xx") == 1
    assert requests("ok", "2xx", "bob", ("route", "/v1/messages")) == 1
    assert requests("client_gone", "4xx") == 1, "logged as 499, the client closed its request"
    errors = {dict(labels)["kind"]: value for (name, labels), value in found.items() if name == "k2proxy_errors_total"}
    assert errors == {"client_error": 1, "upstream_failed": 1, "timeout": 1, "client_gone": 1}
    assert found[("k2proxy_failovers_total", (("route", "/v1/messages"),))] == 1
    assert found[("k2proxy_upstream_attempts_total", (chat_route,))] == 1 + 0 + 2 + 1 + 1  # a timeout of all: a probe
    assert found[("k2proxy_first_content_seconds_count", (chat_route,))] >= 1
    assert found[("k2proxy_request_duration_seconds_count", (chat_route,))] == 5
    states = {dict(labels)["state"]: value for (name, labels), value in found.items() if name == "k2proxy_tokens"}
    pool = state_of(monitored).site.pool.counts()
    assert states == {state: pool[state] for state in ("active", "cooling", "disabled", "expired")}
    assert sum(states.values()) == 2 and found[("k2proxy_in_flight_requests", ())] == 0
    assert found[("k2proxy_prompt_tokens_total", (("key", "alice"),))] == 12
    assert found[("k2proxy_completion_tokens_total", (("key", "alice"),))] == 34


async def test_metrics_need_the_admin_or_metrics_key(make_proxy):
    proxy = await make_proxy(METRICS_KEY="scrape-key-123")
    assert (await proxy.get("/metrics")).status == 401
    assert (await proxy.get("/metrics", headers=AUTH)).status == 401
    assert (await proxy.get("/metrics", headers={"Authorization": "Bearer scrape-key-123"})).status == 200
    assert (await proxy.get("/metrics", headers=ADMIN)).status == 200
    plain = await make_proxy()
    assert (await plain.get("/metrics", headers=ADMIN)).status == 200


async def test_the_request_log_says_what_happened_and_nothing_secret(monitored, fake):
    await traffic(monitored, fake)
    log = (await (await monitored.get("/admin/requests", headers=ADMIN)).json())["requests"]
    assert [entry["status"] for entry in log] == [499, 200, 504, 502, 404, 200], "newest first"
    newest_first_gone, failover, timeout, _failed, refused, success = log
    assert success["key"] == "alice" and success["model"] == k2proxy.load_settings({}).models[0]
    assert success["prompt_tokens"] == 12 and success["token"] in (0, 1) and success["first_content_ms"] >= 0
    assert refused["reason"] == "model_not_found" and refused["model"] == "gpt-4" and refused["key"] == ""
    assert timeout["reason"] == "upstream_timeout" and failover["failovers"] == 1 and failover["key"] == "bob"
    assert newest_first_gone["outcome"] == "client gone" and newest_first_gone["stream"] is True
    text = json.dumps(log)
    for secret in (API_KEY, ADMIN_KEY, "sk-alice-0123456789", "sk-bob-0123456789", *TOKENS, "secret question"):
        assert secret not in text
    errors = (await (await monitored.get("/admin/requests?status=5xx", headers=ADMIN)).json())["requests"]
    assert [entry["status"] for entry in errors] == [504, 502]
    alice = (await (await monitored.get("/admin/requests?key=alice", headers=ADMIN)).json())["requests"]
    assert len(alice) == 1 and (await monitored.get("/admin/requests?status=3xx", headers=ADMIN)).status == 400
    newest = (await (await monitored.get("/admin/requests?limit=2", headers=ADMIN)).json())["requests"]
    assert newest == log[:2]
    refused = await monitored.get("/admin/requests?limit=0", headers=ADMIN)
    assert refused.status == 400 and "limit" in (await refused.json())["error"]["message"]


async def test_the_last_hour_minute_by_minute(monitored, fake):
    await traffic(monitored, fake)
    minutes = (await (await monitored.get("/admin/history", headers=ADMIN)).json())["minutes"]
    assert len(minutes) == 60 and minutes[-1]["minute"] <= time.time() < minutes[-1]["minute"] + 60
    assert [b["minute"] - a["minute"] for a, b in pairwise(minutes)] == [60] * 59, "a row a minute, in order"
    totals = {name: sum(minute[name] for minute in minutes)
              for name in ("requests", "client_errors", "upstream_failures", "clients_gone")}
    assert totals == {"requests": 6, "client_errors": 1, "upstream_failures": 2, "clients_gone": 1}
    served = [minute for minute in minutes if minute["first_content_p50_ms"] is not None]
    assert served and all(m["first_content_p95_ms"] >= m["first_content_p50_ms"] for m in served)
    tokens = (await (await monitored.get("/admin/tokens/stats", headers=ADMIN)).json())["tokens"]
    assert len(tokens[0]["last_hour"]) == 60
    assert sum(requests for token in tokens for requests, _ in token["last_hour"]) == 7
    failures = sum(failures for token in tokens for _, failures in token["last_hour"])
    assert failures == 2 + 1 + 1, "500s, a timeout, a 401"


async def test_a_key_over_its_rate_is_refused_before_upstream_while_others_are_served(monitored, fake):
    for _ in range(5):
        assert (await monitored.post("/v1/chat/completions", json=chat(), headers=as_key(ALICE))).status == 200
    sent = len(fake.received)
    refused = await monitored.post("/v1/chat/completions", json=chat(), headers=as_key(ALICE))
    error = (await refused.json())["error"]
    assert refused.status == 429 and error["code"] == "rate_limited" and 1 <= int(refused.headers["Retry-After"]) <= 60
    anthropic = await monitored.post("/v1/messages", json={"model": "claude-x", "max_tokens": 9, "messages": [
        {"role": "user", "content": "hi"}]}, headers={"x-api-key": "sk-alice-0123456789"})
    assert anthropic.status == 429 and (await anthropic.json())["error"]["type"] == "rate_limit_error"
    assert len(fake.received) == sent, "nothing was sent upstream"
    assert (await monitored.post("/v1/chat/completions", json=chat(), headers=as_key(BOB))).status == 200
    assert (await monitored.get("/v1/models", headers=as_key(ALICE))).status == 200, "only completions count"


async def test_a_key_over_its_streams_at_once_is_refused(monitored, fake):
    fake.reply = Reply(reasoning="x" * 3000, piece=5, delay=0.02)
    streams = [await monitored.post("/v1/chat/completions", json=chat(stream=True), headers=as_key(BOB))
               for _ in range(2)]
    third = await monitored.post("/v1/chat/completions", json=chat(stream=True), headers=as_key(BOB))
    assert third.status == 429 and (await third.json())["error"]["code"] == "too_many_at_once"
    for stream in streams:
        stream.close()
    await until(lambda: state_of(monitored).monitor.in_flight == 0)
    fake.reply = Reply()
    assert (await monitored.post("/v1/chat/completions", json=chat(stream=True), headers=as_key(BOB))).status == 200


async def test_a_key_edited_while_it_streams_gets_its_slots_back_when_they_end(monitored, fake, tmp_path):
    fake.reply = Reply(reasoning="x" * 3000, piece=5, delay=0.02)
    streams = [await monitored.post("/v1/chat/completions", json=chat(stream=True), headers=as_key(BOB))
               for _ in range(2)]
    (tmp_path / "api_keys.txt").write_text(KEYS_FILE.replace("alice:sk-alice-0123456789 rpm=5",
                                                             "alice:sk-alice-0123456789"))
    await until(lambda: state_of(monitored).keys.named[0].rpm is None)
    for stream in streams:
        stream.close()
    await until(lambda: state_of(monitored).monitor.in_flight == 0)
    fake.reply = Reply(reasoning="x" * 3000, piece=5, delay=0.02)
    again = [await monitored.post("/v1/chat/completions", json=chat(stream=True), headers=as_key(BOB))
             for _ in range(2)]
    assert [response.status for response in again] == [200, 200], "the ended streams no longer count"
    for stream in again:
        stream.close()


async def test_edits_to_the_keys_file_apply_within_two_seconds(monitored, tmp_path):
    assert (await monitored.get("/v1/models", headers={"Authorization": "Bearer sk-dave-0123456789"})).status == 401
    (tmp_path / "api_keys.txt").write_text(KEYS_FILE + "dave:sk-dave-0123456789\n")
    started = time.monotonic()
    while (await monitored.get("/v1/models", headers={"Authorization": "Bearer sk-dave-0123456789"})).status != 200:
        assert time.monotonic() - started < 2, "the new key was not picked up within 2 s"
        await asyncio.sleep(0.05)


async def test_the_admin_api_edits_keys_without_ever_holding_them(monitored, tmp_path):
    listed = await (await monitored.get("/admin/keys", headers=ADMIN)).json()
    assert [k["name"] for k in listed["keys"]] == ["alice", "bob", "ci"] and "sk-alice" not in json.dumps(listed)
    keys = [{"name": "alice", "rpm": 10, "concurrent": None}, {"name": "eve", "key": "sk-eve-0123456789", "rpm": None,
                                                                 "concurrent": 1}]
    saved = await (await monitored.post("/admin/keys/update", json={"keys": keys, "version": listed["version"]},
                                        headers=ADMIN)).json()
    assert saved["ok"] and "sk-eve" not in json.dumps(saved)
    assert (tmp_path / "api_keys.txt").read_text() == ("# team keys\nalice:sk-alice-0123456789 rpm=10\n"
                                                       "eve:sk-eve-0123456789 concurrent=1\n")
    assert (await monitored.get("/v1/models", headers={"Authorization": "Bearer sk-eve-0123456789"})).status == 200
    assert (await monitored.get("/v1/models", headers=as_key(BOB))).status == 401
    stale = await monitored.post("/admin/keys/update", json={"keys": keys, "version": listed["version"]}, headers=ADMIN)
    assert stale.status == 409 and (await stale.json())["error"]["code"] == "file_changed"
    for bad in ([{"name": "new-one"}], [{"name": "a b", "key": "k"}], [{"name": "x", "key": "k", "rpm": 0}],
                [{"name": "x", "key": "k"}, {"name": "x", "key": "j"}]):
        assert (await monitored.post("/admin/keys/update", json={"keys": bad}, headers=ADMIN)).status == 400


async def test_each_named_key_has_its_figures_and_requests_without_a_key_their_label(monitored, fake):
    await traffic(monitored, fake)
    unnamed = await monitored.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer nope"})
    assert unnamed.status == 401
    keys = {key["name"]: key for key in (await (await monitored.get("/admin/keys", headers=ADMIN)).json())["keys"]}
    assert {name: (key["requests"], key["errors"], key["active"]) for name, key in keys.items()} == {
        "alice": (1, 0, 0), "bob": (1, 0, 0), "ci": (0, 0, 0)}
    assert (keys["alice"]["prompt_tokens"], keys["alice"]["completion_tokens"]) == (12, 34)
    found = samples(await (await monitored.get("/metrics", headers=ADMIN)).text())
    without_key = {dict(labels)["outcome"]: value for (name, labels), value in found.items()
                   if name == "k2proxy_requests_total" and dict(labels)["key"] == "(none)"}
    assert without_key == {"client_error": 1}


async def test_a_client_gone_while_its_stream_is_written_is_logged_as_499(monitored, fake, monkeypatch):
    send = k2proxy.EventStream._send

    async def transport_closed_at_the_end(stream, render, last=False):
        if last:
            raise k2proxy.ClientGone()
        await send(stream, render)
    monkeypatch.setattr(k2proxy.EventStream, "_send", transport_closed_at_the_end)
    streamed = await monitored.post("/v1/chat/completions", json=chat(stream=True), headers=as_key(ALICE))
    events, _ = await read_sse(streamed)
    assert events and "[DONE]" not in events
    newest = (await (await monitored.get("/admin/requests?limit=1", headers=ADMIN)).json())["requests"][0]
    assert (newest["status"], newest["outcome"], newest["key"]) == (499, "client gone", "alice")


@pytest.mark.parametrize("digit", ["²", "①", "٣"])
async def test_digits_that_are_not_ascii_are_refused_not_a_crash(monitored, tmp_path, caplog, digit):
    before = [key.name for key in state_of(monitored).keys.named]
    (tmp_path / "api_keys.txt").write_text(f"odd:sk-odd-0123456789 rpm={digit}\ndave:sk-dave-0123456789\n")
    dave = {"Authorization": "Bearer sk-dave-0123456789"}
    await until(lambda: "lines 1 are not name:key" in caplog.text)
    assert [key.name for key in state_of(monitored).keys.named] == before, "the last good file stays"
    assert (await monitored.get("/v1/models", headers=dave)).status == 401
    for path in (f"/admin/requests?limit={digit}", f"/admin/tokens/reset/{digit}"):
        response = await monitored.request("GET" if "requests" in path else "POST", path, headers=ADMIN)
        assert response.status == 400, path


async def test_admin_polling_logs_at_debug_and_completions_at_info(proxy, caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    for path in ("/admin/status", "/admin/tokens/stats", "/admin/requests", "/admin/history", "/health"):
        assert (await proxy.get(path, headers=ADMIN)).status == 200
    await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    lines = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    assert not [line for line in lines if "/admin/" in line or "/health" in line]
    assert any(line.startswith("POST /v1/chat/completions") for line in lines)


async def test_a_refused_admin_request_is_still_logged_at_info(proxy, caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    assert (await proxy.get("/admin/status")).status == 401
    assert "GET /admin/status" in caplog.text


async def test_an_upload_under_way_holds_its_keys_concurrent_slot(keyed, fake):
    proxy = await keyed("concurrent=1")
    url = proxy.make_url("/v1/chat/completions")
    release = asyncio.Event()

    async def trickle():
        yield b'{"model": "' + MODEL.encode() + b'", '
        await asyncio.wait_for(release.wait(), 10)
        yield b'"messages": [{"role": "user", "content": "hi"}]}'

    async with aiohttp.ClientSession() as session:
        upload = asyncio.ensure_future(session.post(url, data=trickle(), headers=as_key(ALICE)))
        await until(lambda: state_of(proxy).keys.named[0].active == 1)
        second = await proxy.post("/v1/messages/count_tokens", json={"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}]}, headers=as_key(ALICE))
        assert second.status == 429 and "at once" in (await second.json())["error"]["message"]
        assert (await proxy.post("/v1/chat/completions", json=chat(), headers=as_key(BOB))).status == 200
        release.set()
        assert (await asyncio.wait_for(upload, 10)).status == 200


async def test_an_upload_to_count_tokens_holds_one_of_its_keys_concurrent_slots(keyed, fake):
    proxy = await keyed("concurrent=1")
    release = asyncio.Event()

    async def trickle():
        yield b'{"model": "' + MODEL.encode() + b'", '
        await asyncio.wait_for(release.wait(), 10)
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


async def test_token_counts_and_stored_response_reads_count_against_rpm(keyed, fake):
    proxy = await keyed("rpm=2")
    count = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    statuses = [(await proxy.post("/v1/messages/count_tokens", json=count, headers=as_key(ALICE))).status
                for _ in range(2)]
    third = await proxy.get("/v1/responses/resp_nothing", headers=as_key(ALICE))
    assert statuses == [200, 200] and third.status == 429


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


async def test_a_reload_keeps_each_named_keys_counts(keyed, fake, tmp_path):
    proxy = await keyed("rpm=2")
    for _ in range(2):
        assert (await proxy.post("/v1/chat/completions", json=chat(), headers=as_key(ALICE))).status == 200
    (tmp_path / "api_keys.txt").write_text(f"alice:{ALICE} rpm=2\nbob:{BOB} rpm=9\n")
    await until(lambda: state_of(proxy).keys.named[1].rpm == 9)
    assert (await proxy.post("/v1/chat/completions", json=chat(), headers=as_key(ALICE))).status == 429


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
