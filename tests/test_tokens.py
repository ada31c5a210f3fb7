"""The token pool: files, rotation, failover, health rules, expiry, upstream's Retry-After (an hour at most),
file watching (a file read while it is written), atomic saves (a line another program appends meanwhile kept)."""

import asyncio
import collections
import json
import pathlib
import time

import pytest
from conftest import ADMIN, ALICE, AUTH, BOB, CHAT, chat, pool_of, read_sse, state_of, stream_text, until
from fake_api import ApiReply
from fake_site import AUTH_EXPIRED, Reply, make_jwt

import k2proxy

GOOD = [make_jwt(time.time() + 3600, f"acc-{n}") for n in range(4)]
EXPIRED = make_jwt(time.time() - 60, "old")


def write_tokens(tmp_path, *tokens, name="tokens.txt"):
    (tmp_path / name).write_text("\n".join(tokens) + "\n")


@pytest.fixture
def user_proxy(make_proxy, tmp_path):
    async def start(*tokens, **env):
        write_tokens(tmp_path, *tokens)
        return await make_proxy(PROXY_MODE="user", **env)
    return start


async def ask(proxy, stream=False):
    response = await proxy.post("/v1/chat/completions", json=chat(stream=stream), headers=AUTH)
    if stream and response.status == 200:
        events, _ = await read_sse(response)
        return response.status, events
    return response.status, await response.json()


def test_tokens_file_format():
    text = "# comment\n\n  tok-a  \ntok-b\n# tok-c\ntok-a\n\ttok-d\t\n"
    assert k2proxy.parse_tokens_file(text) == ["tok-a", "tok-b", "tok-d"]


def test_jwt_expiry_is_read_without_the_key():
    assert k2proxy.jwt_expiry(make_jwt(1764000000)) == 1764000000
    assert k2proxy.jwt_expiry("not-a-jwt") is None
    assert k2proxy.jwt_expiry("a.!!!.c") is None


def test_masking_never_shows_a_whole_token():
    token = GOOD[0]
    masked = k2proxy.mask_token(token)
    assert masked.startswith(token[:4]) and masked.endswith(token[-3:]) and len(masked) < 10
    assert k2proxy.mask_token("short") != "short"


async def test_missing_file_is_an_empty_pool_with_a_log_line(make_proxy, caplog, fake):
    caplog.set_level("INFO", logger="k2proxy")
    proxy = await make_proxy(PROXY_MODE="user")
    assert "not found" in caplog.text and "tokens.txt" in caplog.text
    status, body = await ask(proxy)
    assert status == 503 and "tokens.txt" in body["error"]["message"]
    assert fake.received == []


async def test_guest_mode_without_a_token_file_is_not_a_warning(make_proxy, caplog):
    caplog.set_level("INFO", logger="k2proxy")
    await make_proxy()
    assert "requests go without a token" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


async def test_guest_mode_with_no_tokens_sends_no_authorization(proxy, fake):
    status, _ = await ask(proxy)
    assert status == 200 and "Authorization" not in fake.received[0].headers


async def test_guest_mode_uses_guest_tokens_when_given(make_proxy, fake, tmp_path):
    write_tokens(tmp_path, GOOD[0], name="tokens_guest.txt")
    proxy = await make_proxy()
    await ask(proxy)
    assert fake.received[0].path == "/api/guest/chat/completions" and fake.received[0].token == GOOD[0]


async def test_rotation_is_fair_under_concurrency(user_proxy, fake):
    proxy = await user_proxy(*GOOD[:3])
    fake.reply = Reply(delay=0.01, piece=20)
    results = await asyncio.gather(*(ask(proxy, stream=n % 2 == 0) for n in range(60)))
    assert all(status == 200 for status, _ in results)
    assert collections.Counter(r.token for r in fake.received) == {GOOD[0]: 20, GOOD[1]: 20, GOOD[2]: 20}
    assert all(r.path == "/api/chat/completions" for r in fake.received)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bad", [Reply(status=401, body=json.dumps(AUTH_EXPIRED)), Reply(status=403, body="no"),
                                 Reply(status=502, body="bad gateway"), Reply(first_delay=2),
                                 Reply(drop_after=0), Reply(status=429, headers={"Retry-After": "30"})])
async def test_failover_to_the_next_token_before_any_content(user_proxy, fake, stream, bad):
    proxy = await user_proxy(GOOD[0], GOOD[1], REQUEST_TIMEOUT="0.5")
    fake.by_token[GOOD[0]] = bad
    fake.reply = Reply(answer="from the good token")
    status, body = await ask(proxy, stream)
    assert status == 200
    text = stream_text(body[:-1]) if stream else body["choices"][0]["message"]["content"]
    assert text == "from the good token"
    assert [r.token for r in fake.received] == [GOOD[0], GOOD[1]]
    first = pool_of(proxy).credentials[0]
    assert first.last_error and (first.failures == 1 or first.cooling_until)


async def test_retries_stop_at_max_retries(user_proxy, fake):
    proxy = await user_proxy(*GOOD, MAX_RETRIES=2)
    fake.reply = Reply(status=500, body="down")
    status, _body = await ask(proxy)
    assert status == 502 and len(fake.received) == 3


async def test_failure_after_content_is_not_retried_but_is_charged_while_another_token_works(user_proxy, fake):
    proxy = await user_proxy(GOOD[0], GOOD[1])
    fake.by_token[GOOD[0]] = Reply(reasoning="x" * 100, piece=5, drop_after=5)
    assert (await ask(proxy))[0] == 200 and [r.token for r in fake.received] == [GOOD[0], GOOD[1]]
    assert pool_of(proxy).credentials[0].failures == 1, "GOOD[1] answered where GOOD[0] failed"
    fake.received.clear()
    status, events = await ask(proxy, stream=True)  # GOOD[0]'s turn: content, then the drop
    assert status == 200 and events[-2]["error"] and [r.token for r in fake.received] == [GOOD[0]]
    assert pool_of(proxy).credentials[0].failures == 2


async def test_auth_failures_disable_until_reset(user_proxy, fake):
    proxy = await user_proxy(GOOD[0], GOOD[1], MAX_TOKEN_FAILURES=2)
    fake.by_token[GOOD[0]] = Reply(status=401, body=json.dumps(AUTH_EXPIRED))
    for _ in range(4):
        assert (await ask(proxy))[0] == 200
    pool = pool_of(proxy)
    assert pool.stats()[0]["status"] == "disabled"
    pool.clock = lambda: time.time() + 1000
    assert pool.stats()[0]["status"] == "disabled", "auth failures are not re-admitted by time"
    sent_to_first = sum(r.token == GOOD[0] for r in fake.received)
    assert sent_to_first == 2
    del fake.by_token[GOOD[0]]
    assert (await proxy.post("/admin/tokens/reset/0", headers=ADMIN)).status == 200
    assert pool.stats()[0]["status"] == "active"


async def test_other_failures_disable_then_readmit_on_probation(user_proxy, fake):
    proxy = await user_proxy(GOOD[0], GOOD[1], MAX_TOKEN_FAILURES=2, TOKEN_COOLDOWN=300)
    fake.by_token[GOOD[0]] = Reply(status=500, body="flaky")
    for _ in range(3):
        await ask(proxy)
    pool = pool_of(proxy)
    assert pool.stats()[0]["status"] == "disabled"
    pool.clock = lambda: time.time() + 301
    assert pool.stats()[0]["status"] == "active"
    fake.received.clear()
    await ask(proxy)
    await ask(proxy)
    assert pool.stats()[0]["status"] == "disabled", "one more failure on probation disables it again"
    assert [r.token for r in fake.received].count(GOOD[0]) == 1


async def test_success_resets_the_failure_count(user_proxy, fake):
    proxy = await user_proxy(GOOD[0], GOOD[1])
    fake.script = [Reply(status=500, body="x"), Reply()]
    assert (await ask(proxy))[0] == 200
    first = pool_of(proxy).credentials[0]
    assert first.failures == 1, "charged: GOOD[1] answered the same request"
    assert (await ask(proxy))[0] == 200 and fake.received[-1].token == GOOD[0]
    assert first.failures == 0 and first.successes == 1


async def test_rate_limited_token_cools_down_and_is_skipped(user_proxy, fake):
    proxy = await user_proxy(GOOD[0], GOOD[1])
    fake.by_token[GOOD[0]] = Reply(status=429, headers={"Retry-After": "120"})
    await ask(proxy)
    pool = pool_of(proxy)
    stats = pool.stats()[0]
    assert stats["status"] == "cooling" and stats["failures"] == 0
    assert 100 < stats["cooling_until"] - time.time() <= 120
    fake.received.clear()
    for _ in range(3):
        await ask(proxy)
    assert {r.token for r in fake.received} == {GOOD[1]}


async def test_every_token_cooling_gives_429_with_retry_after(user_proxy, fake):
    proxy = await user_proxy(GOOD[0], GOOD[1])
    fake.reply = Reply(status=429, body='{"detail": "slow down"}')
    response = await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    assert response.status == 429
    fake.received.clear()
    response = await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    assert response.status == 429 and 1 <= int(response.headers["Retry-After"]) <= 60
    assert (await response.json())["error"]["type"] == "rate_limit_error"
    assert fake.received == []


async def test_expired_tokens_are_never_sent(user_proxy, fake):
    proxy = await user_proxy(EXPIRED, GOOD[0])
    for _ in range(3):
        assert (await ask(proxy))[0] == 200
    assert {r.token for r in fake.received} == {GOOD[0]}
    assert pool_of(proxy).stats()[0]["status"] == "expired"


async def test_only_unusable_tokens_gives_503(user_proxy, fake):
    proxy = await user_proxy(EXPIRED)
    status, body = await ask(proxy)
    assert status == 503 and body["error"]["code"] == "no_usable_tokens" and fake.received == []


@pytest.mark.parametrize("how", ["append", "remove", "rename"])
async def test_file_edits_are_picked_up_within_two_seconds(user_proxy, fake, tmp_path, how):
    proxy = await user_proxy(GOOD[0], GOOD[1])
    pool = pool_of(proxy)
    await ask(proxy)
    path = tmp_path / "tokens.txt"
    if how == "append":
        with path.open("a") as out:
            out.write(GOOD[2] + "\n")
        expected = GOOD[:3]
    elif how == "remove":
        path.write_text(GOOD[1] + "\n")
        expected = [GOOD[1]]
    else:
        (tmp_path / "tokens.txt.swp").write_text(f"{GOOD[0]}\n{GOOD[3]}\n")
        (tmp_path / "tokens.txt.swp").replace(path)
        expected = [GOOD[0], GOOD[3]]
    await until(lambda: [t.value for t in pool.credentials] == expected, 2.0)  # the 2 s the pool promises
    if GOOD[0] in expected:
        assert pool.credentials[0].requests == 1, "tokens still present keep their stats"


async def test_auth_disabled_token_returns_when_its_line_changes(user_proxy, fake, tmp_path):
    proxy = await user_proxy(GOOD[0], MAX_TOKEN_FAILURES=1)
    fake.by_token[GOOD[0]] = Reply(status=401, body="{}")
    await ask(proxy)
    pool = pool_of(proxy)
    assert pool.stats()[0]["status"] == "disabled"
    (tmp_path / "tokens.txt").write_text(GOOD[1] + "\n")
    await until(lambda: pool.stats()[0]["status"] == "active", 2.0)  # the 2 s the pool promises
    assert pool.credentials[0].value == GOOD[1]


async def test_admin_reload_readmits_disabled_tokens(user_proxy, fake):
    proxy = await user_proxy(GOOD[0], MAX_TOKEN_FAILURES=1)
    fake.reply = Reply(status=401, body="{}")
    await ask(proxy)
    assert pool_of(proxy).stats()[0]["status"] == "disabled"
    response = await proxy.post("/admin/tokens/reload", headers=ADMIN)
    assert response.status == 200 and (await response.json())["counts"]["active"] == 1


async def test_save_is_atomic_and_keeps_comments(user_proxy, tmp_path):
    path = tmp_path / "tokens.txt"
    proxy = await user_proxy(GOOD[0])
    path.write_text(f"# my accounts\n{GOOD[0]}\n# spare\n")
    response = await proxy.post("/admin/tokens/update", json={"tokens": [GOOD[1], " ", GOOD[2], GOOD[1]]},
                                headers=ADMIN)
    assert response.status == 200
    assert path.read_text() == f"# my accounts\n# spare\n{GOOD[1]}\n{GOOD[2]}\n"
    assert [t.value for t in pool_of(proxy).credentials] == [GOOD[1], GOOD[2]]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tokens")] == []


async def test_save_failure_leaves_the_old_file_whole(user_proxy, tmp_path, monkeypatch):
    path = tmp_path / "tokens.txt"
    proxy = await user_proxy(GOOD[0], GOOD[1])

    def crash(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(k2proxy.os, "fsync", crash)
    response = await proxy.post("/admin/tokens/update", json={"tokens": [GOOD[2]]}, headers=ADMIN)
    assert response.status == 500 and "No space left" in (await response.json())["error"]["message"]
    assert path.read_text() == f"{GOOD[0]}\n{GOOD[1]}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.txt"]


async def test_concurrent_saves_and_edits_never_lose_a_token(user_proxy, tmp_path):
    path = tmp_path / "tokens.txt"
    proxy = await user_proxy(GOOD[0])
    sets = [[f"tok-{n}-{i}" for i in range(5)] for n in range(20)]
    responses = await asyncio.gather(*(proxy.post("/admin/tokens/update", json={"tokens": s}, headers=ADMIN)
                                       for s in sets))
    assert all(r.status == 200 for r in responses)
    saved = k2proxy.parse_tokens_file(path.read_text())
    assert saved in sets
    assert [t.value for t in pool_of(proxy).credentials] == saved


async def test_a_save_with_a_stale_version_is_refused(user_proxy, tmp_path):
    path = tmp_path / "tokens.txt"
    proxy = await user_proxy(GOOD[0])
    loaded = await (await proxy.get("/admin/tokens/content", headers=ADMIN)).json()
    path.write_text(f"{GOOD[0]}\n{GOOD[1]}\n")
    response = await proxy.post("/admin/tokens/update", json={"content": f"{GOOD[2]}\n", "version": loaded["version"]},
                                headers=ADMIN)
    assert response.status == 409 and (await response.json())["error"]["code"] == "file_changed"
    assert path.read_text() == f"{GOOD[0]}\n{GOOD[1]}\n"
    fresh = await (await proxy.get("/admin/tokens/content", headers=ADMIN)).json()
    response = await proxy.post("/admin/tokens/update", json={"content": f"{GOOD[2]}\n", "version": fresh["version"]},
                                headers=ADMIN)
    assert response.status == 200 and path.read_text() == f"{GOOD[2]}\n"
    assert (await response.json())["version"] == (await (await proxy.get("/admin/tokens/content",
                                                                         headers=ADMIN)).json())["version"]


async def test_versions_ignore_line_endings(user_proxy):
    proxy = await user_proxy(GOOD[0])
    version = (await (await proxy.get("/admin/tokens/content", headers=ADMIN)).json())["version"]
    for content in (f"{GOOD[1]}\r\n{GOOD[2]}\r\n", f"\ufeff{GOOD[1]}\n"):
        response = await proxy.post("/admin/tokens/update", json={"content": content, "version": version},
                                    headers=ADMIN)
        assert response.status == 200, await response.text()
        version = (await response.json())["version"]
        assert version == (await (await proxy.get("/admin/tokens/content", headers=ADMIN)).json())["version"]


async def test_a_file_that_cannot_be_read_is_read_again_once_it_can(user_proxy, tmp_path, monkeypatch, caplog):
    """Fixing a file's owner or mode changes neither its content nor its size: the watcher must try again."""
    proxy = await user_proxy(GOOD[0])
    read_text, blocked = k2proxy.Path.read_text, [True]

    def guarded(path, *args, **kwargs):
        if path.name == "tokens.txt" and blocked[0]:
            raise PermissionError(13, "Permission denied")
        return read_text(path, *args, **kwargs)
    monkeypatch.setattr(k2proxy.Path, "read_text", guarded)
    write_tokens(tmp_path, GOOD[1])
    await until(lambda: "Permission denied" in caplog.text)
    assert [t.value for t in pool_of(proxy).credentials] == [GOOD[0]], "what was loaded stays"
    blocked[0] = False
    await until(lambda: [t.value for t in pool_of(proxy).credentials] == [GOOD[1]])
    assert caplog.text.count("cannot be read") == 1


async def test_a_byte_order_mark_is_not_part_of_the_first_token(make_proxy, fake, tmp_path):
    (tmp_path / "tokens.txt").write_text(f"{GOOD[0]}\n", encoding="utf-8-sig")
    proxy = await make_proxy(PROXY_MODE="user")
    assert (await ask(proxy))[0] == 200
    assert fake.received[-1].token == GOOD[0]


async def test_a_token_path_that_is_a_directory_is_reported_not_fatal(make_proxy, fake, tmp_path, caplog):
    """Docker creates a directory when a missing file is bind-mounted."""
    (tmp_path / "tokens.txt").mkdir()
    proxy = await make_proxy(PROXY_MODE="user")
    assert "tokens.txt cannot be read" in caplog.text
    status, body = await ask(proxy)
    assert status == 503 and body["error"]["code"] == "no_tokens"
    response = await proxy.get("/admin/tokens/content", headers=ADMIN)
    assert response.status == 409 and (await response.json())["error"]["code"] == "token_file_unreadable"


async def test_mode_switch_changes_the_upstream_path_and_file(make_proxy, fake, tmp_path):
    write_tokens(tmp_path, GOOD[0])
    proxy = await make_proxy()
    await ask(proxy)
    response = await proxy.post("/admin/switch_mode", json={"mode": "user"}, headers=ADMIN)
    assert response.status == 200 and (await response.json())["mode"] == "user"
    await ask(proxy)
    assert [(r.path, r.token) for r in fake.received] == [("/api/guest/chat/completions", ""),
                                                           ("/api/chat/completions", GOOD[0])]
    assert fake.received[1].headers["Referer"] == fake.url + "/"
    health = await (await proxy.get("/health")).json()
    assert health["mode"] == "user" and health["tokens"]["total"] == 1


async def test_without_tokens_there_is_one_identity_and_a_429_is_not_asked_again(proxy, fake, caplog):
    caplog.set_level("INFO", logger="k2proxy")
    fake.reply = Reply(status=429, headers={"Retry-After": "30"})
    response = await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    assert response.status == 429 and len(fake.received) == 1
    attempts = [r.getMessage() for r in caplog.records if "upstream attempt" in r.getMessage()]
    assert len(attempts) == 1 and "anonymous" in attempts[0] and "token 1 of" not in caplog.text


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
    await keys.reload()  # the change seen
    await keys.reload()  # read, as the rest is written
    assert [key.name for key in keys.named] == ["alice"] and keys.find(BOB[:5]) is None
    await keys.reload()
    await keys.reload()
    assert keys.find(BOB).name == "bob" and keys.find(BOB[:5]) is None


async def test_a_keys_file_rewritten_in_place_is_taken_only_once_it_stays_as_it_is(proxy_settings, tmp_path):
    path = tmp_path / "api_keys.txt"
    path.write_text(f"alice:{ALICE}\n")
    keys = k2proxy.ApiKeys(proxy_settings(API_KEYS_FILE=path))
    await keys.reload()
    path.write_text(f"alice:{ALICE}\nbob:{BOB[:5]}")  # truncated and written again, cut inside bob's key
    await keys.reload()  # a poll sees the change
    assert keys.find(BOB[:5]) is None
    with open(path, "a") as writer:  # the writer goes on before the next poll
        writer.write(BOB[5:] + "\n")
    await keys.reload()
    assert keys.find(BOB[:5]) is None and keys.find(BOB) is None, "changed since the last poll: not taken yet"
    await keys.reload()
    assert keys.find(BOB).name == "bob" and keys.find(BOB[:5]) is None and keys.find(ALICE).name == "alice"


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
    await site.pool.reload()  # the change seen
    await site.pool.reload()  # read, as the rest is written
    assert [c.value for c in site.pool.credentials] == [whole]
    await site.pool.reload()
    await site.pool.reload()
    assert [c.value for c in site.pool.credentials] == [whole, other]


async def test_upstreams_retry_after_is_capped(make_proxy, fake, tmp_path):
    (tmp_path / "tokens.txt").write_text(make_jwt(time.time() + 3600) + "\n")
    proxy = await make_proxy(PROXY_MODE="user")
    fake.reply = Reply(status=429, body='{"detail": "slow down"}', headers={"Retry-After": "99999999999"})
    await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    token = state_of(proxy).site.pool.credentials[0]
    assert token.cooling_until <= time.time() + k2proxy.RETRY_AFTER_MAX + 1


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


# ─── an outage that is upstream's: nobody disabled, one probe a request, served again at once ───

@pytest.mark.parametrize("storm", [Reply(status=500, body="down"), Reply(status=502, body="<html>bad gateway</html>"),
                                   Reply(drop_after=0), Reply(first_delay=2)])
async def test_a_site_outage_disables_no_token_and_service_returns_with_the_site(user_proxy, fake, storm):
    proxy = await user_proxy(*GOOD[:3], REQUEST_TIMEOUT="0.5")
    for _ in range(3):  # every token has answered: the storm hits a working pool
        assert (await ask(proxy))[0] == 200
    fake.received.clear()
    fake.reply = storm
    statuses = [(await ask(proxy, stream=n % 2 == 0))[0] for n in range(8)]
    assert set(statuses) <= {502, 504}
    assert len(fake.received) == 3 + 7, "the first request tries every token, then each request is one probe"
    fake.reply = Reply(answer="back")
    status, body = await ask(proxy)
    assert status == 200 and body["choices"][0]["message"]["content"] == "back"
    stats = pool_of(proxy).stats()
    assert [row["status"] for row in stats] == ["active"] * 3
    assert max(row["failures"] for row in stats) <= 1, "at most the first failures, while others still worked"


async def test_an_api_slower_than_request_timeout_disables_no_key_and_each_request_waits_once(api_proxy, fake_api):
    keys = [f"IFM-key-{n}" for n in range(3)]
    proxy = await api_proxy(key=",".join(keys), REQUEST_TIMEOUT="0.3")
    fake_api.reply = ApiReply(first_delay=2)
    statuses = []
    for _ in range(6):
        response = await asyncio.wait_for(proxy.post(CHAT, json=chat(), headers=AUTH), 0.3 * 3 + 3)
        statuses.append(response.status)
    assert statuses == [504] * 6
    assert len(fake_api.received) == 3 + 5, "once every key has timed out, a request waits for one, not for each"
    fake_api.reply = ApiReply(answer="back")
    response = await proxy.post(CHAT, json=chat(), headers=AUTH)
    assert response.status == 200 and (await response.json())["choices"][0]["message"]["content"] == "back"
    stats = await (await proxy.get("/admin/ifm-keys/stats", headers=ADMIN)).json()
    assert [row["status"] for row in stats["tokens"]] == ["active"] * 3
    assert all(row["failures"] == 0 for row in stats["tokens"]), "no key ever answered: nothing was theirs"


async def test_a_token_that_fails_where_the_others_answer_is_still_disabled(user_proxy, fake):
    proxy = await user_proxy(*GOOD[:3], MAX_TOKEN_FAILURES=2)
    fake.by_token[GOOD[0]] = Reply(status=500, body="this token's account is broken")
    for _ in range(6):
        assert (await ask(proxy))[0] == 200
    assert [row["status"] for row in pool_of(proxy).stats()] == ["disabled", "active", "active"]
