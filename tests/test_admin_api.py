"""The admin JSON API: key required everywhere, tokens masked everywhere but the editor's route."""

import json
import time

import pytest
from conftest import ADMIN, ADMIN_KEY, API_KEY, AUTH, chat
from fake_upstream import make_jwt

TOKENS = [make_jwt(time.time() + 3600, f"acc-{n}") for n in range(3)]
ROUTES = [("GET", "/admin/status"), ("GET", "/admin/tokens/stats"), ("GET", "/admin/tokens/content"),
          ("POST", "/admin/tokens/reset/0"), ("POST", "/admin/tokens/reset-all"), ("POST", "/admin/tokens/reload"),
          ("POST", "/admin/tokens/update"), ("POST", "/admin/switch_mode")]


@pytest.fixture
async def admin_proxy(make_proxy, tmp_path):
    (tmp_path / "tokens.txt").write_text("# pool\n" + "\n".join(TOKENS) + "\n")
    return await make_proxy(PROXY_MODE="user")


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, AUTH, {"Authorization": ADMIN_KEY}])
async def test_every_admin_route_needs_the_admin_key(admin_proxy, method, path, headers):
    response = await admin_proxy.request(method, path, json={"mode": "guest", "tokens": []}, headers=headers)
    body = await response.json()
    assert response.status == 401 and body["error"]["type"] == "authentication_error"
    text = await response.text()
    assert all(token not in text for token in TOKENS)
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
        assert all(token not in text for token in TOKENS), path
        assert all(token[-3:] in text for token in TOKENS) or path != "/admin/tokens/stats"
    text = await (await admin_proxy.get("/health")).text()
    assert all(token not in text for token in TOKENS)
    content = await (await admin_proxy.get("/admin/tokens/content", headers=ADMIN)).json()
    assert content["tokens"] == TOKENS and content["content"].startswith("# pool\n")
    assert all(token not in caplog.text for token in TOKENS)
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
    text = f"# edited in the page\n{TOKENS[2]}\n"
    response = await admin_proxy.post("/admin/tokens/update", json={"content": text}, headers=ADMIN)
    assert response.status == 200 and "1 tokens" in (await response.json())["message"]
    assert (tmp_path / "tokens.txt").read_text() == text


async def test_reset_all(admin_proxy):
    response = await admin_proxy.post("/admin/tokens/reset-all", headers=ADMIN)
    assert response.status == 200 and (await response.json())["ok"] is True


async def test_a_stream_that_fails_midway_counts_as_an_error(admin_proxy, fake, caplog):
    from fake_upstream import Reply
    caplog.set_level("INFO", logger="k2proxy")
    fake.reply = Reply(reasoning="x" * 100, piece=5, drop_after=5)
    response = await admin_proxy.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    assert response.status == 200 and b"upstream_error" in await response.read()
    stats = (await (await admin_proxy.get("/admin/status", headers=ADMIN)).json())["stats"]
    assert stats["requests"] == 1 and stats["errors"] == 1
    assert "status=200 (ended with error, upstream_error)" in caplog.text


async def test_saving_a_line_that_is_not_a_jwt_warns_but_saves_it(admin_proxy, tmp_path):
    content = "# pool\n" + TOKENS[0] + "\nnot-a-jwt-at-all-12345\n"
    body = await (await admin_proxy.post("/admin/tokens/update", json={"content": content}, headers=ADMIN)).json()
    assert body["ok"] and (tmp_path / "tokens.txt").read_text() == content
    assert len(body["warnings"]) == 1
    assert body["warnings"][0].startswith("line 3:") and "not a JWT" in body["warnings"][0]
    assert "not-a-jwt-at-all-12345" not in json.dumps(body), "masked, like every token outside the editor"


async def test_resetting_an_expired_token_says_why_it_stays_expired(make_proxy, tmp_path):
    (tmp_path / "tokens.txt").write_text(make_jwt(time.time() - 60) + "\n" + TOKENS[0] + "\n")
    proxy = await make_proxy(PROXY_MODE="user")
    one = await (await proxy.post("/admin/tokens/reset/0", headers=ADMIN)).json()
    assert "stays expired" in one["message"] and "replace it" in one["message"]
    everyone = await (await proxy.post("/admin/tokens/reset-all", headers=ADMIN)).json()
    assert "1 stay expired" in everyone["message"]
    assert (await (await proxy.post("/admin/tokens/reset/1", headers=ADMIN)).json())["message"] == "Token 1 reset"
