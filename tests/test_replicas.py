"""Replicas sharing one Redis (REDIS_URL) and WORKERS: a real redis-server (Debian's package) and real
`python k2proxy.py` processes, each in a directory of its own, so that only Redis joins them; without
redis-server these tests are skipped, naming its install command (failed instead under K2PROXY_REQUIRE_PROGRAMS=1,
as CI runs them)."""

import asyncio
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import aiohttp
import pytest
from conftest import (
    ADMIN,
    API_KEY,
    E2E_ADMIN_KEY,
    E2E_KEY,
    MODEL,
    ROOT,
    chat,
    free_port,
    http_json,
    need_program,
    wait_for_port,
)
from fake_upstream import make_jwt

import k2proxy

FIRST, SECOND = (make_jwt(time.time() + 86400, name, signature)
                 for name, signature in (("first", "c2lnMQ"), ("second", "c2lnMg")))  # masked, still two


def eventually(condition, seconds=5.0):
    """Waits for what another process does in the background (an exchange with Redis), failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "did not happen in time"
        time.sleep(0.05)


def completion(fleet, replica, key=E2E_KEY, **extra):
    return fleet.call(replica, "POST", "/v1/chat/completions", chat(**extra), key)


def test_a_key_limit_holds_across_replicas(replicas):
    fleet = replicas(count=3, files={"api_keys.txt": "team:sk-team rpm=3\n"})
    statuses = [completion(fleet, number % 3, "sk-team")[0] for number in range(4)]
    assert statuses == [200, 200, 200, 429], "three a minute for the whole fleet, not three per replica"
    status, body = completion(fleet, 1, "sk-team")
    assert status == 429 and body["error"]["code"] == "rate_limited"


def open_stream(url, key):
    """A streamed completion left open: the connection, once the proxy has started answering."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request("POST", "/v1/chat/completions", json.dumps(chat(stream=True)),
                       {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    response.read1(1)  # the first frame: the request holds its slot
    return connection


def test_a_slot_held_on_one_replica_is_counted_by_the_others_and_freed_when_it_ends(replicas):
    fleet = replicas(files={"api_keys.txt": "solo:sk-solo concurrent=1\n"})
    fleet.steer(script=[{"hang_after": 12}])  # the next answer stops after a few frames and stays open
    held = open_stream(fleet.urls[0], "sk-solo")
    status, body = completion(fleet, 1, "sk-solo")
    assert (status, body["error"]["code"]) == (429, "too_many_at_once")
    held.close()  # the client leaves: its replica gives the slot back
    eventually(lambda: completion(fleet, 1, "sk-solo")[0] == 200)


async def test_a_slot_of_a_replica_that_died_is_freed_when_its_lease_expires(redis_server, monkeypatch):
    monkeypatch.setattr(k2proxy, "LEASE_SECONDS", 1)
    settings = k2proxy.load_settings({"VALID_API_KEY": API_KEY})
    died, alive = k2proxy.Shared(redis_server.url, "died"), k2proxy.Shared(redis_server.url, "alive")
    for shared in (died, alive):
        await shared.beat()
    keys_died, keys_alive = (k2proxy.ApiKeys(settings, k2proxy.SharedKeyLimits(shared)) for shared in (died, alive))
    for keys in (keys_died, keys_alive):
        keys.take([k2proxy.ApiKey("solo", "sk-solo", concurrent=1)])
    await keys_died.admit(keys_died.named[0])  # and never renews nor gives it back
    with pytest.raises(k2proxy.ApiError) as refused:
        await keys_alive.admit(keys_alive.named[0])
    assert refused.value.code == "too_many_at_once"
    deadline = time.monotonic() + 5
    while True:  # a deadline: the lease expires in Redis's own time, which sends no event
        try:
            slot = await keys_alive.admit(keys_alive.named[0])
            break
        except k2proxy.ApiError:
            assert time.monotonic() < deadline, "the dead replica's lease never expired"
            await asyncio.sleep(0.05)
    assert slot.ticket
    for shared in (died, alive):
        await shared.leave()


def test_a_stored_response_continues_and_is_read_on_another_replica(replicas):
    fleet = replicas()
    status, first = fleet.call(0, "POST", "/v1/responses", {"model": MODEL, "input": "Remember the number 42."})
    assert status == 200
    assert fleet.call(1, "GET", f"/v1/responses/{first['id']}") == (200, first)
    status, second = fleet.call(1, "POST", "/v1/responses", {"model": MODEL, "input": "Which number was it?",
                                                             "previous_response_id": first["id"]})
    assert status == 200 and second["id"] != first["id"]
    sent = json.dumps(fleet.received()[-1]["body"]["messages"])
    assert "Remember the number 42." in sent and "Which number was it?" in sent, "the whole conversation went upstream"
    assert fleet.call(1, "DELETE", f"/v1/responses/{first['id']}")[0] == 200
    status, body = fleet.call(0, "GET", f"/v1/responses/{first['id']}")
    assert (status, body["error"]["code"]) == (404, "response_not_found")
    status, body = fleet.call(0, "GET", f"/v1/responses/{second['id']}", key="sk-someone-else")
    assert status == 401, "another key's stored responses stay its own on every replica"


def test_a_compaction_made_on_one_replica_is_opened_on_another(replicas):
    fleet = replicas()  # each with a compaction key generated in a home of its own: they agree on one in Redis
    status, compacted = fleet.call(0, "POST", "/v1/responses/compact", {"model": MODEL, "input": "Remember 42."})
    assert status == 200 and compacted["object"] == "response.compaction"
    [item] = compacted["output"]
    status, answer = fleet.call(1, "POST", "/v1/responses", {"model": MODEL, "input": [
        item, {"role": "user", "content": "Which number?"}]})
    assert status == 200, answer
    own = [(home / "k2proxy_compaction_key.txt").read_text() for home in fleet.homes]
    assert own[0] != own[1], "the keys each generated differ; the one they seal under is shared"


def test_a_key_added_on_one_replicas_admin_api_works_on_another_within_two_seconds(replicas):
    fleet = replicas(count=3)
    assert completion(fleet, 1, "sk-new")[0] == 401
    status, _ = fleet.admin(0, "POST", "/admin/keys/update", {"keys": [{"name": "new", "key": "sk-new"}]})
    assert status == 200
    eventually(lambda: all(completion(fleet, number, "sk-new")[0] == 200 for number in (1, 2)), seconds=2)
    assert "new:sk-new" in (fleet.homes[2] / "api_keys.txt").read_text(), "kept in that replica's file too"


def test_tokens_saved_on_one_replicas_admin_page_are_used_by_the_others(replicas):
    fleet = replicas(PROXY_MODE="user", files={"tokens.txt": FIRST + "\n"})
    assert fleet.admin(0, "POST", "/admin/tokens/update", {"tokens": [SECOND]})[0] == 200
    eventually(lambda: fleet.admin(1, "GET", "/admin/tokens/stats")[1]["tokens"][0]["masked"]
               == k2proxy.mask_token(SECOND), seconds=2)
    assert completion(fleet, 1)[0] == 200 and fleet.received()[-1]["token"] == SECOND


def test_a_token_rested_on_one_replica_is_skipped_by_the_others(replicas):
    fleet = replicas(PROXY_MODE="user", files={"tokens.txt": f"{FIRST}\n{SECOND}\n"})
    fleet.steer(token=FIRST, status=429, body='{"detail": "Too many requests"}', headers={"Retry-After": "600"})
    assert completion(fleet, 0)[0] == 200, "the first token is rate limited; the second answers"
    assert [record["token"] for record in fleet.received()] == [FIRST, SECOND]
    eventually(lambda: fleet.admin(1, "GET", "/admin/tokens/stats")[1]["tokens"][0]["status"] == "cooling")
    for _ in range(3):
        assert completion(fleet, 1)[0] == 200
    assert [record["token"] for record in fleet.received()[2:]] == [SECOND] * 3, "the rested token is not tried"


def health(fleet, replica):
    return fleet.call(replica, "GET", "/health")


def test_redis_stopped_then_restarted_mid_run(replicas, redis_server):
    fleet = replicas()
    redis_server.stop()
    assert completion(fleet, 0)[0] == 200 and completion(fleet, 1)[0] == 200, "both keep serving"
    eventually(lambda: health(fleet, 0)[1]["status"] == "degraded")
    status, body = health(fleet, 0)
    assert status == 200 and body["redis"] == "unreachable" and body["reason"] == k2proxy.REDIS_DOWN_PUBLIC
    assert "Redis at 127.0.0.1" in fleet.admin(0, "GET", "/admin/status")[1]["redis"]["problem"]
    status, kept = fleet.call(0, "POST", "/v1/responses", {"model": MODEL, "input": "Kept while Redis is down."})
    assert status == 200 and fleet.call(0, "GET", f"/v1/responses/{kept['id']}") == (200, kept)
    status, body = fleet.call(1, "GET", f"/v1/responses/{kept['id']}")
    assert (status, body["error"]["code"]) == (503, "store_unreachable"), "said, not silently a 404"
    redis_server.start()
    eventually(lambda: all(health(fleet, number)[1]["status"] == "ok" for number in (0, 1)), seconds=10)
    assert fleet.call(1, "GET", f"/v1/responses/{kept['id']}") == (200, kept), "moved to Redis when it came back"


async def test_after_redis_lost_its_data_a_response_kept_elsewhere_is_a_503_until_put_back(redis_server, caplog):
    now = [1000.0]
    one, two = (k2proxy.Shared(redis_server.url, name, clock=lambda: now[0]) for name in ("one", "two"))
    stores = [k2proxy.SharedResponseStore(k2proxy.ResponseStore(k2proxy.load_settings({})), shared)
              for shared in (one, two)]
    for shared in (one, two):
        await shared.beat()
    redis_server.stop()
    await stores[0].put({"id": "resp_kept", "output": []}, [], "owner")  # Redis gone: replica one keeps it
    redis_server.start()  # empty
    with caplog.at_level(logging.WARNING, logger="k2proxy"):
        for _ in range(3):  # replica two reaches Redis again first (its first command may meet a dead connection)
            await two.beat()
    assert two.up and not one.up and "lost its data" in caplog.text
    with pytest.raises(k2proxy.ApiError) as refused:
        await stores[1].get("resp_kept", "owner")
    assert (refused.value.status, refused.value.code) == (503, "store_unreachable"), "said, not silently a 404"
    assert "lost its data" in refused.value.message
    await one.beat()  # replica one is back and puts back what it kept
    assert await stores[1].get("resp_kept", "owner") is not None
    now[0] += k2proxy.REFILL_SECONDS
    for shared in (one, two):
        await shared.beat()
    assert await stores[1].get("resp_unknown", "owner") is None, "once the replicas have had time, unknown is a 404"
    for shared in (one, two):
        await shared.leave()


def test_the_admin_api_shows_every_replica_and_the_fleets_log_and_metrics_are_per_replica(replicas):
    fleet = replicas()
    assert completion(fleet, 0)[0] == 200 and completion(fleet, 1)[0] == 200
    names = [fleet.admin(number, "GET", "/admin/status")[1]["replicas"] for number in (0, 1)]
    assert len(names[0]) == 2 and all(seen["uptime_s"] >= 0 for seen in names[0])
    assert [seen["this"] for seen in names[0]] != [seen["this"] for seen in names[1]], "each marks itself"
    eventually(lambda: len(fleet.admin(0, "GET", "/admin/requests")[1]["requests"]) == 2)
    logged = fleet.admin(0, "GET", "/admin/requests")[1]["requests"]
    assert {entry["replica"] for entry in logged} == {seen["name"] for seen in names[0]}
    request = urllib.request.Request(fleet.urls[1] + "/metrics", headers={"Authorization": f"Bearer {E2E_ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        metrics = response.read().decode()
    this = next(seen["name"] for seen in names[1] if seen["this"])
    assert f'k2proxy_in_flight_requests{{replica="{this}"}} 0' in metrics


def test_workers_needs_redis_url_and_says_so():
    run = subprocess.run([sys.executable, str(ROOT / "k2proxy.py")], env={**os.environ, "WORKERS": "2",
                                                                         "VALID_API_KEY": E2E_KEY},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "WORKERS=2 needs REDIS_URL" in run.stderr


def test_workers_serve_one_port_as_replicas_and_stop_together(redis_server, tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "k2proxy.py")], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={
                                   **os.environ, "WORKERS": "2", "REDIS_URL": redis_server.url, "PORT": str(port),
                                   "HOST": "127.0.0.1", "VALID_API_KEY": E2E_KEY, "ADMIN_KEY": E2E_ADMIN_KEY})
    try:
        wait_for_port(port, process)
        url = f"http://127.0.0.1:{port}/admin/status"
        eventually(lambda: len(http_json("GET", url, key=E2E_ADMIN_KEY)[1]["replicas"]) == 2)
        serving = {next(seen["name"] for seen in http_json("GET", url, key=E2E_ADMIN_KEY)[1]["replicas"]
                        if seen["this"]) for _ in range(40)}
        assert len(serving) == 2, "the kernel spreads connections over both workers"
        died = sorted(serving)[0]
        os.kill(int(died.rsplit(":", 1)[1]), signal.SIGKILL)

        def replicas_seen():
            try:
                return {seen["name"] for seen in http_json("GET", url, key=E2E_ADMIN_KEY)[1]["replicas"]}
            except OSError:  # a connection the killed worker had queued
                return set()
        eventually(lambda: len(replicas_seen() - serving) == 1, seconds=10)  # a worker that dies is started again
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    with pytest.raises(OSError):
        http_json("GET", f"http://127.0.0.1:{port}/health", timeout=1)


async def test_sigterm_lets_every_workers_streams_finish(redis_server, spawn, tmp_path):
    upstream, port = free_port(), free_port()
    spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(upstream), "--site", "k2horizon"], upstream)
    http_json("POST", f"http://127.0.0.1:{upstream}/_fake/reply",
              {"reasoning": "x" * 300, "answer": "all of it", "piece": 5, "delay": 0.03})  # about 2 s
    process = spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path, env={
        "WORKERS": "2", "REDIS_URL": redis_server.url, "PORT": str(port), "HOST": "127.0.0.1", "SHUTDOWN_GRACE": "15",
        "VALID_API_KEY": E2E_KEY, "K2THINK_BASE_URL": f"http://127.0.0.1:{upstream}"})

    async def stream(session, first):
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat(stream=True)) as response:
            lines = []
            async for raw in response.content:
                if raw.startswith(b"data: "):
                    lines.append(raw[6:].strip().decode())
                    first.set()
            return lines

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {E2E_KEY}"},
                                     connector=aiohttp.TCPConnector(force_close=True)) as session:
        firsts = [asyncio.Event() for _ in range(6)]
        streams = [asyncio.ensure_future(stream(session, first)) for first in firsts]
        await asyncio.wait_for(asyncio.gather(*(first.wait() for first in firsts)), 10)
        process.send_signal(signal.SIGTERM)
        answers = await asyncio.wait_for(asyncio.gather(*streams), 15)
    for lines in answers:
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] == "stop"
    assert await asyncio.to_thread(process.wait, 10) == 0
    assert process.stderr.read().count("requests in flight get 15 s to finish") == 2, "both workers drained"


async def test_redis_down_is_warned_once_a_minute_and_named_by_health(caplog):
    now = [1000.0]
    shared = k2proxy.Shared(f"redis://127.0.0.1:{free_port()}/0", "here", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="k2proxy"):
        for moment in (1000.0, 1030.0, 1059.0, 1061.0):
            now[0] = moment
            await shared.beat()
    warnings = [record.getMessage() for record in caplog.records if "cannot be reached" in record.getMessage()]
    assert len(warnings) == 2 and "Redis at 127.0.0.1:" in warnings[0]
    assert shared.problem().code == "redis_unreachable" and "Redis at 127.0.0.1:" in shared.problem().message
    with pytest.raises(k2proxy.Unshared):
        await shared.run(lambda redis: redis.ping())
    await shared.client.aclose()


async def test_a_redis_password_never_reaches_the_log_or_health(caplog):
    shared = k2proxy.Shared(f"redis://:hunter2secret@127.0.0.1:{free_port()}/0", "here")
    with caplog.at_level(logging.WARNING, logger="k2proxy"):
        await shared.beat()
    assert "hunter2secret" not in caplog.text + shared.problem().message
    await shared.client.aclose()
    settings = k2proxy.load_settings({"VALID_API_KEY": API_KEY, "REDIS_URL": "redis://:hunter2secret@x:1/0"})
    assert "REDIS_URL" not in settings.public()


async def test_one_replica_signs_an_account_in_and_the_others_take_its_token(fake, proxy_settings, redis_server,
                                                                              tmp_path):
    fake.accounts = {"ann@example.com": "pw"}
    (tmp_path / "accounts.txt").write_text("ann@example.com:pw\n")
    settings = proxy_settings(PROXY_MODE="user", ACCOUNTS_FILE=str(tmp_path / "accounts.txt"),
                              REDIS_URL=redis_server.url)
    states = [k2proxy.AppState(settings), k2proxy.AppState(settings)]
    for name, state in zip(("first", "second"), states):  # two replicas in one process: named apart
        state.shared.replica = name
        await state.http.open()
        await state.shared.beat()
    try:
        for state in states:
            await state.accounts.run()
        assert len(fake.signins) == 1, "the second replica leaves the sign-in to the first"
        for state in states:
            await state.fleet.sync()
        tokens = [state.site.pools["user"].credentials for state in states]
        assert [len(held) for held in tokens] == [1, 1] and tokens[0][0].value == tokens[1][0].value
        assert states[1].accounts.stats()[0]["status"] == "signed_in"
    finally:
        for state in states:
            await state.http.stop()
            await state.shared.leave()


async def test_credential_state_and_the_days_tokens_are_the_fleets(proxy_settings, redis_server):
    settings = proxy_settings(UPSTREAM="api", IFM_API_KEY="ifm-one,ifm-two", REDIS_URL=redis_server.url)
    first, second = states = [k2proxy.AppState(settings), k2proxy.AppState(settings)]
    for state in states:
        await state.shared.beat()
        await state.api.pool.reload()

    async def exchange():
        for state in (*states, *states):  # each publishes, then takes what the other published
            await state.fleet.sync()

    try:
        await exchange()  # nothing happened yet: nothing changes
        assert [row["status"] for row in second.api.pool.stats()] == ["active", "active"]
        first.api.pool.spent(first.api.pool.credentials[0], 120, 0)  # its daily budget is spent: it rests
        first.api.pool.spent(first.api.pool.credentials[1], 30, 5000)
        second.api.pool.spent(second.api.pool.credentials[1], 20, 4000)
        await exchange()
        for state in states:
            spent, other = state.api.pool.stats()
            assert (spent["status"], spent["tokens_today"], spent["budget_left"]) == ("cooling", 120, 0)
            assert (other["status"], other["tokens_today"], other["budget_left"]) == ("active", 50, 4000)
        second.api.pool.reset(second.api.pool.credentials[0])  # the admin page's reset, on the second replica
        await exchange()
        assert first.api.pool.stats()[0]["status"] == "active"
        first.api.pool.fail(first.api.pool.credentials[1], k2proxy.UpstreamError(k2proxy.RATE_LIMITED, "429", 600))
        second.api.pool.spent(second.api.pool.credentials[1], 10, 3000)  # at once: other fields, both kept
        await exchange()
        for state in states:
            row = state.api.pool.stats()[1]
            assert (row["status"], row["budget_left"], row["tokens_today"]) == ("cooling", 3000, 60)
    finally:
        for state in states:
            await state.shared.leave()


NGINX_CONF = """
worker_processes 1;
error_log {home}/error.log;
pid {home}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {home}/body;
  proxy_temp_path {home}/proxy;
  client_max_body_size 64m;
  client_body_buffer_size 16m;
  upstream k2proxy {{ server 127.0.0.1:{first}; server 127.0.0.1:{second}; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://k2proxy;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 900s;
    }}
  }}
}}
"""


@pytest.fixture
def nginx(tmp_path):
    """nginx (Debian's package) round-robin in front of two replicas: start(first_url, second_url) → its URL."""
    program = need_program("nginx", "apt-get install nginx-light (Debian's package)", "/usr/sbin/nginx")
    processes = []

    def start(*urls):
        home, port = tmp_path / "nginx", free_port()
        home.mkdir()
        first, second = (urllib.parse.urlsplit(url).port for url in urls)
        (home / "nginx.conf").write_text(NGINX_CONF.format(home=home, port=port, first=first, second=second))
        process = subprocess.Popen([program, "-p", str(home), "-c", str(home / "nginx.conf"), "-g", "daemon off;"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        processes.append(process)
        wait_for_port(port, process)
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


def test_codex_runs_a_multi_turn_task_through_nginx_in_front_of_two_replicas(replicas, nginx, tmp_path):
    from test_clients import IFM_KEY, codex
    fleet = replicas(api=True, UPSTREAM="api", IFM_API_KEY=IFM_KEY)
    fleet.url = nginx(*fleet.urls)
    marker = f"tool-ran-{os.urandom(4).hex()}"
    thoughts = [f"First list the folder. Marker {marker}.", "Now print the marker.", "The output shows the marker."]
    calls = [{"name": "exec_command", "arguments": {"cmd": "ls"}},
             {"name": "exec_command", "arguments": {"cmd": f"echo {marker}"}}]
    fleet.steer(script=[{"reasoning": thoughts[0], "answer": "", "tool_calls": [calls[0]]},
                        {"reasoning": thoughts[1], "answer": "", "tool_calls": [calls[1]]},
                        {"reasoning": thoughts[2], "answer": "The command printed the marker."}])
    run = codex(fleet, tmp_path, "List the folder, then run the marker command")
    assert (run.returncode, run.stdout.strip()) == (0, "The command printed the marker."), run.stderr
    sent = [record for record in fleet.received() if record["path"] == "/v1/chat/completions"]
    assert [record["status"] for record in sent] == [200, 200, 200]
    assert len({record["session_id"] for record in sent}) == 1, "one X-Session-ID on both replicas"
    for turn, record in enumerate(sent[1:], 1):
        replayed = [m.get("reasoning_content") or m.get("reasoning") for m in record["body"]["messages"]
                    if m["role"] == "assistant"]
        assert replayed == thoughts[:turn], "each turn's reasoning replayed, whichever replica made it"
    assert marker in json.dumps(sent[2]["body"]["messages"]), "the command's output went back to the model"

    def served():
        return [entry["replica"] for entry in fleet.admin(0, "GET", "/admin/requests")[1]["requests"]
                if entry["route"] == "/v1/responses"]
    eventually(lambda: len(served()) == 3)
    assert len(set(served())) == 2, "nginx sent the turns to both replicas"


def test_reasoning_a_client_dropped_is_replayed_whichever_replica_gave_it(replicas):
    fleet = replicas(api=True, UPSTREAM="api", IFM_API_KEY="ifm-replay")
    fleet.steer(reasoning="Seven is prime: no divisor between 2 and 6.", answer="Yes, 7 is prime.")
    status, first = completion(fleet, 0, content="Is 7 prime?")
    assert status == 200 and first["choices"][0]["message"]["reasoning_content"], first
    follow_up = chat(content="And 9?")
    follow_up["messages"][:0] = [{"role": "user", "content": "Is 7 prime?"},
                                 {"role": "assistant", "content": "Yes, 7 is prime."}]  # its reasoning dropped
    assert fleet.call(1, "POST", "/v1/chat/completions", follow_up)[0] == 200
    sent = fleet.received()[-1]["body"]["messages"]
    assert sent[1]["reasoning_content"] == "Seven is prime: no divisor between 2 and 6.", "from the first replica"


async def test_the_days_tokens_start_again_at_midnight_on_every_replica(proxy_settings, redis_server, monkeypatch):
    now = [20834 * 86400.0 - 10]  # ten seconds before a UTC midnight
    monkeypatch.setattr(k2proxy.time, "time", lambda: now[0])
    settings = proxy_settings(UPSTREAM="api", IFM_API_KEY="ifm-one", REDIS_URL=redis_server.url)
    states = [k2proxy.AppState(settings), k2proxy.AppState(settings)]
    for state in states:
        state.api.pool.clock = state.fleet.clock = lambda: now[0]
        await state.shared.beat()
        await state.api.pool.reload()
    try:
        states[0].api.pool.spent(states[0].api.pool.credentials[0], 5000, None)
        for state in (*states, *states):
            await state.fleet.sync()
        assert [state.api.pool.stats()[0]["tokens_today"] for state in states] == [5000, 5000]
        now[0] += 20  # past midnight
        states[1].api.pool.spent(states[1].api.pool.credentials[0], 300, None)
        for state in (*states, *states):
            await state.fleet.sync()
        assert [state.api.pool.stats()[0]["tokens_today"] for state in states] == [300, 300]
    finally:
        for state in states:
            await state.shared.leave()


def shared_store(settings, shared):
    """The store of stored responses as a replica has it: kept in Redis, here while Redis cannot be reached."""
    return k2proxy.SharedResponseStore(k2proxy.ResponseStore(settings), shared)


async def test_a_response_kept_by_a_replica_cut_off_from_redis_is_a_503_elsewhere_not_a_404(redis_server):
    now = [1000.0]
    settings = k2proxy.load_settings({"VALID_API_KEY": API_KEY})
    cut_off, other = (k2proxy.Shared(redis_server.url, name, clock=lambda: now[0]) for name in ("cut-off", "other"))
    for shared in (cut_off, other):
        await shared.beat()
    stores = [shared_store(settings, shared) for shared in (cut_off, other)]
    assert await stores[1].get("resp_unknown", "me") is None, "a 404 while every replica is heard from"
    cut_off.lost(ConnectionError("network split"))
    await stores[0].put({"id": "resp_kept"}, [], "me")
    assert (await stores[0].get("resp_kept", "me")).response() == {"id": "resp_kept"}, "kept where it was made"
    now[0] += 10  # the other replica beats on; the cut-off one cannot
    await other.beat()
    with pytest.raises(k2proxy.ApiError) as unreachable:
        await stores[1].get("resp_kept", "me")
    assert unreachable.value.status == 503 and "not been heard from for 10 s" in unreachable.value.message
    await cut_off.beat()  # the split heals: the response moves to Redis
    assert (await stores[1].get("resp_kept", "me")).response() == {"id": "resp_kept"}
    for shared in (cut_off, other):
        await shared.leave()


async def test_a_request_gone_while_redis_admits_it_gives_its_slot_back(redis_server):
    settings = k2proxy.load_settings({"VALID_API_KEY": API_KEY})
    shared = k2proxy.Shared(redis_server.url, "here")
    await shared.beat()
    limits = k2proxy.SharedKeyLimits(shared)
    keys = k2proxy.ApiKeys(settings, limits)
    keys.take([k2proxy.ApiKey("solo", "sk-solo", concurrent=1)])
    admit = limits.admit_script

    async def admitted_then_cancelled(**arguments):  # Redis counts the slot; its answer never reaches the request
        await admit(**arguments)
        raise asyncio.CancelledError()
    limits.admit_script = admitted_then_cancelled
    with pytest.raises(asyncio.CancelledError):
        await keys.admit(keys.named[0])
    limits.admit_script = admit
    await asyncio.wait_for(asyncio.gather(*limits.freeing), 5)
    assert (await keys.admit(keys.named[0])).ticket, "the slot is free again at once, not after its lease expires"
    await shared.leave()


async def test_an_old_admin_edit_does_not_overwrite_a_file_edited_on_disk_since(proxy_settings, redis_server,
                                                                               tmp_path):
    keys_file = tmp_path / "api_keys.txt"
    settings = proxy_settings(REDIS_URL=redis_server.url, API_KEYS_FILE=str(keys_file))
    editor = k2proxy.AppState(settings)
    await editor.shared.beat()
    keys_file.write_text("revoked:sk-revoked\n")
    await editor.fleet.publish_edit("api_keys", keys_file.read_text())
    keys_file.write_text("")  # the key is taken out by hand, after the admin page's edit
    later = k2proxy.AppState(settings)  # a replica (re)starting with that edit still in Redis
    await later.shared.beat()
    await later.keys.reload()
    await later.fleet.sync()
    assert keys_file.read_text() == "" and later.keys.find("sk-revoked") is None
    for state in (editor, later):
        await state.shared.leave()


def test_a_redis_url_that_does_not_parse_stops_start_up_without_quoting_it():
    run = subprocess.run([sys.executable, str(ROOT / "k2proxy.py")], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "VALID_API_KEY": E2E_KEY, "REDIS_URL": "redis://:s3cr/etpass@host:6379/0"})
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "REDIS_URL is invalid" in run.stderr
    assert "s3cr" not in run.stderr


async def test_a_response_deleted_while_it_moves_to_redis_stays_deleted(redis_server):
    settings = k2proxy.load_settings({"VALID_API_KEY": API_KEY})
    shared = k2proxy.Shared(redis_server.url, "here")
    store = shared_store(settings, shared)
    for number in range(3):
        await store.put({"id": f"resp_{number}"}, [], "me")  # Redis not reached yet: kept here
    put = store.put_shared

    async def delete_meanwhile(response_id, kept):
        await put(response_id, kept)
        if response_id == "resp_0":
            assert await store.delete("resp_0", "me")
    store.put_shared = delete_meanwhile
    await shared.beat()  # Redis is reached: the responses move
    assert await store.get("resp_0", "me") is None
    assert [await store.get(f"resp_{number}", "me") is not None for number in (1, 2)] == [True, True]
    assert store.local.entries == {} and store.local.bytes == 0
    await shared.leave()


async def test_a_response_whose_store_hit_a_blip_in_redis_is_there_before_its_client_sees_the_end(redis_server):
    settings = k2proxy.load_settings({"VALID_API_KEY": API_KEY})
    here, elsewhere = k2proxy.Shared(redis_server.url, "here"), k2proxy.Shared(redis_server.url, "elsewhere")
    for shared in (here, elsewhere):
        await shared.beat()
    store, other = shared_store(settings, here), shared_store(settings, elsewhere)
    put = store.put_shared
    blips = [ConnectionError("a command timed out")]

    async def blip_once(response_id, kept):
        if blips:
            here.lost(blips.pop())
            raise k2proxy.Unshared()
        await put(response_id, kept)
    store.put_shared = blip_once
    await store.put({"id": "resp_blip"}, [], "me")
    assert here.up and store.local.entries == {}, "Redis tried again at once, and the response moved there"
    assert (await other.get("resp_blip", "me")).response() == {"id": "resp_blip"}
    for shared in (here, elsewhere):
        await shared.leave()


def test_redis_url_without_the_redis_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)  # as if requirements-redis.txt were not installed
    with pytest.raises(k2proxy.SettingsError) as missing:
        k2proxy.Shared("redis://127.0.0.1:6379/0", "here")
    assert "pip install -r requirements-redis.txt" in str(missing.value)


async def test_public_health_says_redis_is_down_without_where_it_is_and_the_admin_sees_both(make_proxy):
    port = free_port()
    proxy = await make_proxy(REDIS_URL=f"redis://127.0.0.1:{port}/0")
    health = await (await proxy.get("/health")).json()
    assert health["redis"] == "unreachable" and health["reason"] == k2proxy.REDIS_DOWN_PUBLIC
    assert str(port) not in json.dumps(health) and "127.0.0.1" not in json.dumps(health)
    status = await (await proxy.get("/admin/status", headers=ADMIN)).json()
    assert status["redis"]["up"] is False and status["redis"]["place"] == f"127.0.0.1:{port}/0"
    assert f"127.0.0.1:{port}" in status["redis"]["problem"]
