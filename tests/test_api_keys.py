"""The IFM key pool behind UPSTREAM=api: daily budgets and the minute guard rest a key, refused keys are disabled,
server failures fail over, truncated streams are retried or end with an error, api,site falls back to the site,
--check probes each key, the keys file is watched, and no key ever shows outside the key editor."""

import asyncio
import json
import logging
import subprocess
import sys
import time

import pytest
from conftest import (
    ADMIN,
    ADMIN_KEY,
    API_KEY,
    AUTH,
    CHAT,
    DIALECTS,
    MESSAGES,
    MODEL,
    RESPONSES,
    ROOT,
    asked,
    chat,
    free_port,
    read_named_sse,
    read_sse,
    stream_text,
    until,
)
from fake_api import ApiReply
from fake_site import Reply

import k2proxy

KEY_A = "IFM-first-key-00000000aaa"
KEY_B = "IFM-second-key-0000000bbb"
REFUSED = "IFM-refused-key-000000rrr"
UNKNOWN = "IFM-unknown-key-000000www"
ANSWER = "The answer arrives whole, from the key that did not fail."


def mask(key):
    return k2proxy.mask_token(key)


def next_midnight_utc():
    return (int(time.time() // 86400) + 1) * 86400


@pytest.fixture
def api_proxy(api_proxy):
    """The shared proxy in front of the fake API, with these IFM keys (KEY_A and KEY_B unless a test names others)."""
    return lambda keys=(KEY_A, KEY_B), **env: api_proxy(key=",".join(keys), **env)


async def answer_text(path, response, stream):
    """The answer's text as the client of that dialect reads it."""
    if path == CHAT and stream:
        return stream_text((await read_sse(response))[0])
    if path == CHAT:
        return (await response.json())["choices"][0]["message"]["content"]
    if path == MESSAGES and stream:
        return "".join(data["delta"].get("text", "") for name, data in await read_named_sse(response)
                       if name == "content_block_delta")
    if path == MESSAGES:
        return "".join(block["text"] for block in (await response.json())["content"] if block["type"] == "text")
    if stream:
        return "".join(data["delta"] for name, data in await read_named_sse(response)
                       if name == "response.output_text.delta")
    return "".join(part["text"] for item in (await response.json())["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


def chats(fake_api):
    """The chat completion requests the fake API received (not the model lists)."""
    return [record for record in fake_api.received if record.path == "/v1/chat/completions"]


def keys_used(fake_api):
    return [record.key for record in chats(fake_api)]


async def key_rows(proxy):
    """The IFM keys as /admin/ifm-keys/stats shows them, by masked key."""
    response = await proxy.get("/admin/ifm-keys/stats", headers=ADMIN)
    assert response.status == 200
    return {row["masked"]: row for row in (await response.json())["tokens"]}


async def ask_ok(proxy, times=1):
    for _ in range(times):
        response = await proxy.post(CHAT, json=chat(), headers=AUTH)
        assert response.status == 200, await response.text()


# ─── Daily budget and the minute guard ───────────────────────────────────────

async def test_a_key_whose_daily_budget_is_spent_rests_until_midnight_utc(api_proxy, fake_api):
    """A spent key only earns 429s until 00:00 UTC: it is not asked again today, and the other key serves."""
    proxy = await api_proxy()
    fake_api.daily_used[KEY_A] = fake_api.daily_budget
    await ask_ok(proxy, times=3)
    assert keys_used(fake_api) == [KEY_A, KEY_B, KEY_B, KEY_B]
    assert chats(fake_api)[0].status == 429
    rows = await key_rows(proxy)
    spent, serving = rows[mask(KEY_A)], rows[mask(KEY_B)]
    assert spent["status"] == "cooling" and spent["cooling_until"] == pytest.approx(next_midnight_utc())
    assert spent["budget_left"] == 0, "the 429 said no tokens are left today"
    assert serving["status"] == "active"
    assert serving["budget_left"] == fake_api.daily_budget - fake_api.daily_used[KEY_B]


async def test_no_daily_tokens_left_on_a_good_answer_rests_the_key_too(api_proxy, fake_api):
    """An answer saying the key has no tokens left today is the last one it can give: it rests until 00:00 UTC."""
    proxy = await api_proxy()
    fake_api.by_key[KEY_A] = ApiReply(answer=ANSWER, headers={"x-ratelimit-remaining-tokens-daily": "0"})
    response = await proxy.post(CHAT, json=chat(), headers=AUTH)
    assert response.status == 200 and (await response.json())["choices"][0]["message"]["content"] == ANSWER
    await ask_ok(proxy, times=2)
    assert keys_used(fake_api) == [KEY_A, KEY_B, KEY_B]
    spent = (await key_rows(proxy))[mask(KEY_A)]
    assert spent["status"] == "cooling" and spent["cooling_until"] == pytest.approx(next_midnight_utc())
    assert spent["budget_left"] == 0


@pytest.mark.parametrize("retry_after,rest", [(120, 120), (86400, 3600)], ids=["as-told", "capped-at-an-hour"])
async def test_the_minute_guard_fails_over_and_rests_the_key_for_retry_after(api_proxy, fake_api, retry_after, rest):
    """The per-minute guard costs the client nothing: the other key answers the same request, and the first rests
    for Retry-After (at most an hour)."""
    proxy = await api_proxy()
    fake_api.by_key[KEY_A] = ApiReply(status=429, retry_after=retry_after)
    fake_api.reply = ApiReply(answer=ANSWER)
    before = time.time()
    response = await proxy.post(CHAT, json=chat(), headers=AUTH)
    after = time.time()
    assert response.status == 200 and (await response.json())["choices"][0]["message"]["content"] == ANSWER
    assert keys_used(fake_api) == [KEY_A, KEY_B] and [r.status for r in chats(fake_api)] == [429, 200]
    resting = (await key_rows(proxy))[mask(KEY_A)]
    assert resting["status"] == "cooling" and before + rest <= resting["cooling_until"] <= after + rest
    await ask_ok(proxy, times=2)
    assert keys_used(fake_api)[2:] == [KEY_B, KEY_B]


@pytest.mark.parametrize("path", [CHAT, MESSAGES], ids=["chat", "anthropic"])
async def test_every_key_resting_is_a_429_with_retry_after(api_proxy, fake_api, path):
    """A client told when to come back can wait; while every key rests, upstream is not asked at all."""
    proxy = await api_proxy()
    fake_api.reply = ApiReply(status=429, retry_after=30)
    for attempt in ("keys tried", "keys resting"):
        response = await proxy.post(path, json=asked(path), headers=AUTH)
        body = await response.json()
        assert response.status == 429, attempt
        assert 1 <= int(response.headers["Retry-After"]) <= 30, attempt
        if path == CHAT:
            assert body["error"]["type"] == "rate_limit_error" and body["error"]["message"]
        else:
            assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error" and body["error"]["message"]
    assert keys_used(fake_api) == [KEY_A, KEY_B], "the second request found every key resting"


# ─── Refused keys, server failures, models that are gone ─────────────────────

async def test_a_refused_key_is_disabled_at_once_and_logged_only_masked(api_proxy, fake_api, caplog):
    """A key upstream refuses (401 unknown, 403 not allowed) will not work on a retry: it is never used again, and
    the log names it so that an operator recognises it without it leaking."""
    caplog.set_level(logging.INFO, logger="k2proxy")
    fake_api.keys, fake_api.refused = {KEY_B}, {REFUSED}
    proxy = await api_proxy(keys=(UNKNOWN, REFUSED, KEY_B))
    await ask_ok(proxy, times=4)
    assert keys_used(fake_api) == [UNKNOWN, REFUSED, KEY_B, KEY_B, KEY_B, KEY_B]
    assert [r.status for r in chats(fake_api)][:2] == [401, 403]
    rows = await key_rows(proxy)
    assert rows[mask(UNKNOWN)]["status"] == rows[mask(REFUSED)]["status"] == "disabled"
    for key in (UNKNOWN, REFUSED):
        assert f"{mask(key)} disabled" in caplog.text
        assert key not in caplog.text


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 529])
async def test_a_server_failure_fails_over_to_the_next_key(api_proxy, fake_api, status):
    """A failing or overloaded node is not the key's fault: the next key is tried and the client gets the answer."""
    proxy = await api_proxy()
    fake_api.by_key[KEY_A] = ApiReply(status=status)
    fake_api.reply = ApiReply(answer=ANSWER)
    response = await proxy.post(CHAT, json=chat(), headers=AUTH)
    assert response.status == 200 and (await response.json())["choices"][0]["message"]["content"] == ANSWER
    assert keys_used(fake_api) == [KEY_A, KEY_B] and [r.status for r in chats(fake_api)] == [status, 200]


@pytest.mark.parametrize("path,status,kind", [(CHAT, 503, "service_unavailable"), (MESSAGES, 529, "overloaded_error")],
                         ids=["chat", "anthropic"])
async def test_overloaded_with_no_key_left_is_each_dialects_try_again_soon(api_proxy, fake_api, path, status, kind):
    """OpenAI clients retry a 503, Claude Code a 529: an overloaded API with no key left says so in their terms."""
    proxy = await api_proxy(keys=(KEY_A,))
    fake_api.reply = ApiReply(status=529)
    response = await proxy.post(path, json=asked(path), headers=AUTH)
    body = await response.json()
    assert response.status == status and body["error"]["type"] == kind and body["error"]["message"]
    assert keys_used(fake_api) == [KEY_A]


async def test_an_unknown_model_is_a_404_without_trying_other_keys(api_proxy, fake_api):
    """Another key cannot make a model exist: the client hears at once which model the API does not serve."""
    proxy = await api_proxy()
    fake_api.models = ["IFM/K2-Horizon-32B"]
    response = await proxy.post(CHAT, json=chat(), headers=AUTH)
    error = (await response.json())["error"]
    assert response.status == 404 and error["code"] == "model_not_found" and MODEL in error["message"]
    assert keys_used(fake_api) == [KEY_A]


async def test_a_retired_model_is_a_410_that_says_what_to_do(api_proxy, fake_api):
    """A retired model is gone for every key: the client hears it is deprecated and the operator what to set."""
    retired = "IFM/K2-Think-V2"
    proxy = await api_proxy(MODELS=retired)
    response = await proxy.post(CHAT, json=chat(model=retired), headers=AUTH)
    error = (await response.json())["error"]
    assert response.status == 410 and error["code"] == "model_deprecated"
    assert retired in error["message"] and "MODELS" in error["message"]
    assert keys_used(fake_api) == [KEY_A]


# ─── Truncated streams ───────────────────────────────────────────────────────

@DIALECTS
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_stream_cut_before_any_text_is_retried_on_another_key_in_the_same_session(api_proxy, fake_api,
                                                                                          path, stream):
    """Nothing reached the client, so the answer can be asked again; the same X-Session-ID lands the retry where the
    conversation's cache is."""
    proxy = await api_proxy()
    fake_api.by_key[KEY_A] = ApiReply(reasoning="", truncate="before_content")
    fake_api.reply = ApiReply(answer=ANSWER)
    response = await proxy.post(path, json=asked(path, stream=stream), headers=AUTH)
    assert response.status == 200
    assert await answer_text(path, response, stream) == ANSWER
    first, retry = chats(fake_api)
    assert (first.key, retry.key) == (KEY_A, KEY_B)
    assert first.session_id and first.session_id == retry.session_id


@DIALECTS
async def test_a_stream_cut_after_text_reached_the_client_ends_with_an_error_never_a_clean_stop(api_proxy, fake_api,
                                                                                                path):
    """A client that saw part of an answer must not take it for the whole: the stream ends with the dialect's error."""
    proxy = await api_proxy()
    fake_api.by_key[KEY_A] = ApiReply(answer=ANSWER, truncate="mid_content")
    fake_api.reply = ApiReply(answer=ANSWER)
    response = await proxy.post(path, json=asked(path, stream=True), headers=AUTH)
    assert response.status == 200
    if path == CHAT:
        events, _ = await read_sse(response)
        shown = stream_text(events)
        assert "error" in events[-2] and events[-1] == "[DONE]"
        assert not any(choice.get("finish_reason") for event in events if isinstance(event, dict)
                       for choice in event.get("choices", []))
    else:
        events = await read_named_sse(response)
        names = [name for name, _ in events]
        if path == MESSAGES:
            shown = "".join(data["delta"].get("text", "") for name, data in events if name == "content_block_delta")
            assert names[-1] == "error" and "message_stop" not in names and "message_delta" not in names
        else:
            shown = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
            assert names[-1] == "response.failed" and "response.completed" not in names
    assert shown and ANSWER.startswith(shown) and shown != ANSWER
    assert keys_used(fake_api) == [KEY_A], "what the client saw cannot be taken back by a retry"


# ─── UPSTREAM=api,site ───────────────────────────────────────────────────────

async def test_api_then_site_uses_the_site_only_once_every_key_is_spent(api_proxy, fake_api, fake):
    """The keys' budget is the cheap, documented path; the site takes over only when no key has budget left."""
    proxy = await api_proxy(UPSTREAM="api,site")
    fake_api.reply = ApiReply(answer="From the API.")
    fake.reply = Reply(answer="From the site.")
    spent_now = ApiReply(answer="From the API.", headers={"x-ratelimit-remaining-tokens-daily": "0"})

    async def answered():
        response = await proxy.post(CHAT, json=chat(), headers=AUTH)
        assert response.status == 200, await response.text()
        return (await response.json())["choices"][0]["message"]["content"]

    fake_api.by_key[KEY_A] = spent_now
    assert [await answered() for _ in range(3)] == ["From the API."] * 3, "KEY_B still has budget"
    assert keys_used(fake_api) == [KEY_A, KEY_B, KEY_B] and fake.received == []
    fake_api.by_key[KEY_B] = spent_now
    assert await answered() == "From the API."
    assert [await answered() for _ in range(2)] == ["From the site."] * 2
    assert len(keys_used(fake_api)) == 4 and len(fake.received) == 2
    reset = await proxy.post("/admin/ifm-keys/reset/1", headers=ADMIN)
    assert reset.status == 200
    fake_api.by_key.clear()
    assert await answered() == "From the API.", "a key with budget again takes the API back"
    assert keys_used(fake_api)[-1] == KEY_B and len(fake.received) == 2


# ─── --check ─────────────────────────────────────────────────────────────────

async def test_the_check_probes_each_key_and_names_the_refused_one(proxy_settings, fake_api, tmp_path):
    """An operator with several keys learns which work, how much budget each has left, and what to do about the
    refused one."""
    fake_api.refused = {REFUSED}
    settings = proxy_settings(UPSTREAM="api", IFM_BASE_URL=fake_api.url + "/v1", IFM_API_KEY=f"{KEY_A},{REFUSED}",
                              IFM_KEYS_FILE=tmp_path / "ifm_keys.txt")
    http = k2proxy.HttpClient(settings)
    await http.open()
    try:
        report = await asyncio.wait_for(k2proxy.check_upstream(settings, http), 20)
    finally:
        await http.stop()
    probes = {probe["name"]: probe for probe in report["probes"]}
    good, refused = probes[f"api key {mask(KEY_A)}"], probes[f"api key {mask(REFUSED)}"]
    assert report["works"] and probes["api host"]["verdict"] == "ok"
    assert good["verdict"] == "ok" and MODEL in good["summary"]
    assert good["details"]["budget_left"] == fake_api.daily_budget - fake_api.daily_used[KEY_A]
    assert f"{good['details']['budget_left']:,} tokens left today" in good["summary"]
    assert refused["verdict"] == "failed" and "refused this key" in refused["hint"]
    assert KEY_A not in json.dumps(report) and REFUSED not in json.dumps(report)


def test_the_check_command_prints_each_keys_probe_masked(spawn, tmp_path):
    """`python k2proxy.py --check` is what an operator runs: it passes with one good key and shows the refused key
    only by its mask."""
    port = free_port()
    spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(port), "--api", "--keys", KEY_A,
           "--refused", REFUSED], port)
    run = subprocess.run([sys.executable, str(ROOT / "k2proxy.py"), "--check"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env={
                             "PATH": "", "VALID_API_KEY": API_KEY, "ADMIN_KEY": ADMIN_KEY, "REQUEST_TIMEOUT": "5",
                             "UPSTREAM": "api", "IFM_BASE_URL": f"http://127.0.0.1:{port}/v1",
                             "IFM_API_KEY": f"{KEY_A},{REFUSED}", "IFM_KEYS_FILE": str(tmp_path / "ifm_keys.txt")})
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"✓ api key {mask(KEY_A)}" in run.stdout and "tokens left today" in run.stdout
    assert f"✗ api key {mask(REFUSED)}" in run.stdout and "refused this key" in run.stdout
    for key in (KEY_A, REFUSED):
        assert key not in run.stdout and key not in run.stderr


# ─── Secrets ─────────────────────────────────────────────────────────────────

async def test_no_key_appears_anywhere_but_the_key_editor(api_proxy, fake_api, tmp_path, caplog):
    """Logs, answers, metrics and the admin views are read by more people than the keys are meant for."""
    caplog.set_level(logging.DEBUG)
    fake_api.refused = {REFUSED}
    (tmp_path / "ifm_keys.txt").write_text(f"{REFUSED}\n{KEY_A}\n")
    proxy = await api_proxy(keys=(KEY_B,))
    fake_api.by_key[KEY_A] = ApiReply(status=429, retry_after=30)
    seen = []
    for path in (CHAT, MESSAGES, RESPONSES):
        for stream in (False, True):
            response = await proxy.post(path, json=asked(path, stream=stream), headers=AUTH)
            seen.append(await response.text())
    fake_api.by_key[KEY_B] = ApiReply(status=429, retry_after=30)
    limited = await proxy.post(CHAT, json=chat(), headers=AUTH)
    assert limited.status == 429
    seen.append(await limited.text())
    assert {r.status for r in chats(fake_api)} == {200, 403, 429}
    for view in ("/metrics", "/admin/requests", "/admin/status", "/admin/ifm-keys/stats"):
        response = await proxy.get(view, headers=ADMIN)
        assert response.status == 200, view
        seen.append(await response.text())
    seen.append(await (await proxy.get("/health")).text())  # 503 while every key rests, and says why
    shown = "\n".join(seen + [caplog.text])
    for secret in (KEY_A, KEY_B, REFUSED, API_KEY):
        assert secret not in shown
    assert mask(REFUSED) in shown
    editor = await (await proxy.get("/admin/ifm-keys/content", headers=ADMIN)).json()
    assert editor["tokens"] == [REFUSED, KEY_A], "the file's keys, to the admin"


# ─── Keyless servers and the keys file ───────────────────────────────────────

async def test_a_keyless_server_is_asked_without_authorization(api_proxy, fake_api, tmp_path):
    """A vLLM or SGLang server started without --api-key needs no key, and the proxy invents none."""
    fake_api.self_hosted = True
    (tmp_path / "ifm_keys.txt").write_text("")
    proxy = await api_proxy(keys=())
    response = await proxy.post(CHAT, json=chat(), headers=AUTH)
    assert response.status == 200, await response.text()
    assert chats(fake_api)[-1].key is None and "Authorization" not in chats(fake_api)[-1].headers
    assert (await proxy.get("/health")).status == 200


async def test_a_key_written_into_the_keys_file_is_used_within_two_seconds(api_proxy, fake_api, tmp_path):
    """An operator adds or swaps keys by editing the file, without a restart."""
    keys_file = tmp_path / "ifm_keys.txt"
    keys_file.write_text(KEY_A + "\n")
    fake_api.keys = {KEY_A, KEY_B}
    proxy = await api_proxy(keys=())
    await ask_ok(proxy)
    keys_file.write_text(KEY_B + "\n")
    pool = proxy.server.app[k2proxy.STATE].api.pool
    await until(lambda: [row["masked"] for row in pool.stats()] == [mask(KEY_B)], seconds=2)
    await ask_ok(proxy, times=2)
    assert keys_used(fake_api) == [KEY_A, KEY_B, KEY_B]


async def test_keys_saved_on_the_admin_api_are_used(api_proxy, fake_api, tmp_path):
    """The admin page saves keys over a version check, so two editors cannot silently undo each other."""
    (tmp_path / "ifm_keys.txt").write_text(KEY_A + "\n")
    fake_api.keys = {KEY_A, KEY_B}
    proxy = await api_proxy(keys=())
    loaded = await (await proxy.get("/admin/ifm-keys/content", headers=ADMIN)).json()
    assert loaded["tokens"] == [KEY_A]
    saved = await proxy.post("/admin/ifm-keys/update", json={"tokens": [KEY_B], "version": loaded["version"]},
                             headers=ADMIN)
    assert saved.status == 200, await saved.text()
    stale = await proxy.post("/admin/ifm-keys/update", json={"tokens": [KEY_A], "version": loaded["version"]},
                             headers=ADMIN)
    assert stale.status == 409 and (await stale.json())["error"]["code"] == "file_changed"
    assert (tmp_path / "ifm_keys.txt").read_text().split() == [KEY_B]
    await ask_ok(proxy, times=2)
    assert keys_used(fake_api) == [KEY_B, KEY_B]
