"""The admin JSON API: key required everywhere, tokens masked everywhere but the editor's route, saves that keep
a line another writer appends meanwhile and leave secret files 0600, and what a switch of mode warns of."""

import json
import logging
import os
import stat
import time

import pytest
from conftest import ADMIN, ADMIN_KEY, ALICE, API_KEY, AUTH, BOB, CAROL, POOL_TOKENS, as_key, chat, state_of, until
from fake_site import make_jwt

import k2proxy

ROUTES = [("GET", "/admin/status"), ("GET", "/admin/tokens/stats"), ("GET", "/admin/tokens/content"),
          ("POST", "/admin/tokens/reset/0"), ("POST", "/admin/tokens/reset-all"), ("POST", "/admin/tokens/reload"),
          ("POST", "/admin/tokens/update"), ("POST", "/admin/switch_mode")]


@pytest.fixture
async def admin_proxy(make_proxy, tmp_path):
    (tmp_path / "tokens.txt").write_text("# pool\n" + "\n".join(POOL_TOKENS) + "\n")
    return await make_proxy(PROXY_MODE="user")


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, AUTH, {"Authorization": ADMIN_KEY}])
async def test_every_admin_route_needs_the_admin_key(admin_proxy, method, path, headers):
    response = await admin_proxy.request(method, path, json={"mode": "guest", "tokens": []}, headers=headers)
    body = await response.json()
    assert response.status == 401 and body["error"]["type"] == "authentication_error"
    text = await response.text()
    assert all(token not in text for token in POOL_TOKENS)
    assert (await (await admin_proxy.get("/admin/status", headers=ADMIN)).json())["mode"] == "user"


async def test_status(admin_proxy, fake):
    await admin_proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    body = await (await admin_proxy.get("/admin/status", headers=ADMIN)).json()
    assert body["mode"] == "user" and body["upstream_url"] == fake.url + "/api/chat/completions"
    assert body["counts"] == {"total": 3, "active": 3, "cooling": 0, "disabled": 0, "expired": 0}
    assert body["stats"]["requests"] == 1 and body["stats"]["errors"] == 0 and body["stats"]["avg_ttfb_ms"] > 0
    assert body["settings"]["PROXY_MODE"] == "user"


async def test_only_the_content_route_returns_whole_tokens(admin_proxy, caplog):
    caplog.set_level("DEBUG")
    await admin_proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    for method, path in ROUTES:
        if path in ("/admin/tokens/content", "/admin/tokens/update", "/admin/switch_mode"):
            continue
        text = await (await admin_proxy.request(method, path, headers=ADMIN)).text()
        assert all(token not in text for token in POOL_TOKENS), path
        assert all(token[-3:] in text for token in POOL_TOKENS) or path != "/admin/tokens/stats"
    text = await (await admin_proxy.get("/health")).text()
    assert all(token not in text for token in POOL_TOKENS)
    content = await (await admin_proxy.get("/admin/tokens/content", headers=ADMIN)).json()
    assert content["tokens"] == POOL_TOKENS and content["content"].startswith("# pool\n")
    assert all(token not in caplog.text for token in POOL_TOKENS)
    assert API_KEY not in caplog.text and ADMIN_KEY not in caplog.text


async def test_token_stats_fields(admin_proxy):
    rows = (await (await admin_proxy.get("/admin/tokens/stats", headers=ADMIN)).json())["tokens"]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"index", "masked", "status", "failures", "requests", "successes", "last_used",
                            "last_error", "expires_at", "cooling_until", "account", "last_hour", "tokens_today",
                            "errors", "budget_left"}
    assert rows[0]["expires_at"] > time.time()


@pytest.mark.parametrize("method,path,body,param", [
    ("POST", "/admin/tokens/reset/9", None, "index"),
    ("POST", "/admin/tokens/reset/x", None, "index"),
    ("POST", "/admin/tokens/update", {"tokens": "abc"}, "tokens"),
    ("POST", "/admin/tokens/update", {"tokens": [1]}, "tokens"),
    ("POST", "/admin/tokens/update", {"tokens": ["a\nb"]}, "tokens"),
    ("POST", "/admin/tokens/update", {"content": 5}, "content"),
    ("POST", "/admin/tokens/update", {}, None),
    ("POST", "/admin/tokens/update", [], None),
    ("POST", "/admin/switch_mode", {"mode": "admin"}, "mode"),
    ("POST", "/admin/switch_mode", {}, "mode"),
    ("POST", "/admin/switch_mode", "text", "mode"),
])
async def test_bad_admin_input_is_400(admin_proxy, method, path, body, param):
    response = await admin_proxy.request(method, path, json=body, headers=ADMIN)
    error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == param and error["message"]


async def test_non_json_admin_body_is_400(admin_proxy):
    response = await admin_proxy.post("/admin/switch_mode", data=b"{oops", headers=ADMIN)
    assert response.status == 400 and "JSON" in (await response.json())["error"]["message"]


async def test_update_with_content_writes_the_text(admin_proxy, tmp_path):
    text = f"# edited in the page\n{POOL_TOKENS[2]}\n"
    response = await admin_proxy.post("/admin/tokens/update", json={"content": text}, headers=ADMIN)
    assert response.status == 200 and "1 tokens" in (await response.json())["message"]
    assert (tmp_path / "tokens.txt").read_text() == text


async def test_reset_all(admin_proxy):
    response = await admin_proxy.post("/admin/tokens/reset-all", headers=ADMIN)
    assert response.status == 200 and (await response.json())["ok"] is True


async def test_a_stream_that_fails_midway_counts_as_an_error(admin_proxy, fake, caplog):
    from fake_site import Reply
    caplog.set_level("INFO", logger="k2proxy")
    fake.reply = Reply(reasoning="x" * 100, piece=5, drop_after=5)
    response = await admin_proxy.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    assert response.status == 200 and b"upstream_error" in await response.read()
    stats = (await (await admin_proxy.get("/admin/status", headers=ADMIN)).json())["stats"]
    assert stats["requests"] == 1 and stats["errors"] == 1
    assert "status=200 (ended with error, upstream_error)" in caplog.text


async def test_saving_a_line_that_is_not_a_jwt_warns_but_saves_it(admin_proxy, tmp_path):
    content = "# pool\n" + POOL_TOKENS[0] + "\nnot-a-jwt-at-all-12345\n"
    body = await (await admin_proxy.post("/admin/tokens/update", json={"content": content}, headers=ADMIN)).json()
    assert body["ok"] and (tmp_path / "tokens.txt").read_text() == content
    assert len(body["warnings"]) == 1
    assert body["warnings"][0].startswith("line 3:") and "not a JWT" in body["warnings"][0]
    assert "not-a-jwt-at-all-12345" not in json.dumps(body), "masked, like every token outside the editor"


async def test_resetting_an_expired_token_says_why_it_stays_expired(make_proxy, tmp_path):
    (tmp_path / "tokens.txt").write_text(make_jwt(time.time() - 60) + "\n" + POOL_TOKENS[0] + "\n")
    proxy = await make_proxy(PROXY_MODE="user")
    one = await (await proxy.post("/admin/tokens/reset/0", headers=ADMIN)).json()
    assert "stays expired" in one["message"] and "replace it" in one["message"]
    everyone = await (await proxy.post("/admin/tokens/reset-all", headers=ADMIN)).json()
    assert "1 stay expired" in everyone["message"]
    assert (await (await proxy.post("/admin/tokens/reset/1", headers=ADMIN)).json())["message"] == "Token 1 reset"


SAVES = {  # admin route → (the file's name, the body of a save, a line another writer appends meanwhile)
    "/admin/keys/update": ("api_keys.txt", {"keys": [{"name": "alice", "key": ALICE}]}, f"carol:{CAROL}"),
    "/admin/tokens/update": ("tokens.txt", {"tokens": [make_jwt(time.time() + 3600)]},
                             make_jwt(time.time() + 7200, signature="YXBwZW5kZWQ")),
    "/admin/ifm-keys/update": ("ifm_keys.txt", {"tokens": ["IFM-saved-key-00000000aaa"]}, "IFM-appended-key-0000bbb"),
}


@pytest.fixture
def saving_proxy(make_proxy, tmp_path):
    """A proxy in user mode whose keys, token and IFM key files (each holding a line) are in tmp_path."""
    async def start(route, mode=0o600):
        name = SAVES[route][0]
        (tmp_path / name).write_text({"api_keys.txt": f"bob:{BOB}", "tokens.txt": make_jwt(time.time() + 60),
                                      "ifm_keys.txt": "IFM-first-key-000000000"}[name] + "\n")
        os.chmod(tmp_path / name, mode)
        return await make_proxy(PROXY_MODE="user", API_KEYS_FILE=tmp_path / "api_keys.txt",
                                IFM_KEYS_FILE=tmp_path / "ifm_keys.txt"), tmp_path / name
    return start


@pytest.mark.parametrize("route", list(SAVES))
async def test_an_admin_save_keeps_a_line_another_writer_appends_meanwhile(saving_proxy, fake, monkeypatch, route):
    proxy, path = await saving_proxy(route)
    _, body, appended = SAVES[route]
    real = k2proxy.write_atomically

    def another_writer_first(target, content):
        if target == path and appended not in target.read_text():
            with open(target, "a") as writer:
                writer.write(appended + "\n")
        return real(target, content)

    monkeypatch.setattr(k2proxy, "write_atomically", another_writer_first)
    saved = await proxy.post(route, json=body, headers=ADMIN)
    assert saved.status == 200, await saved.text()
    lines = path.read_text().split()
    saved_line = f"alice:{ALICE}" if route == "/admin/keys/update" else body["tokens"][0]
    assert saved_line in lines and appended in lines
    if route == "/admin/keys/update":
        assert (await proxy.get("/v1/models", headers=as_key(CAROL))).status == 200


@pytest.mark.parametrize("route", list(SAVES))
async def test_a_secret_file_open_to_others_is_warned_of_once_and_saved_0600(saving_proxy, fake, caplog, route):
    caplog.set_level(logging.WARNING, logger="k2proxy")
    proxy, path = await saving_proxy(route, mode=0o644)
    warning = f"{path} holds secrets but others may read it"
    await until(lambda: warning in caplog.text)
    with open(path, "a") as writer:  # read again, still open to others
        writer.write("# edited\n")
    watched = {"/admin/keys/update": state_of(proxy).keys.file, "/admin/tokens/update": state_of(proxy).site.pool.file,
               "/admin/ifm-keys/update": state_of(proxy).api.pool.file}[route]
    await until(lambda: watched.state == watched.stat())
    saved = await proxy.post(route, json=SAVES[route][1], headers=ADMIN)
    assert saved.status == 200 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert caplog.text.count(warning) == 1


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


async def test_switching_to_user_mode_with_no_tokens_warns(proxy):
    body = await (await proxy.post("/admin/switch_mode", json={"mode": "user"}, headers=ADMIN)).json()
    assert body["ok"] and body["warnings"] and "No tokens" in body["warnings"][0]
    assert "no request can be served now" in body["message"]
