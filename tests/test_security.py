"""Security: constant-time keys, secrets never logged nor shown (not even when upstream repeats them), log lines
that clients cannot forge, size limits on chunked uploads, no file reading."""

import json
import logging
import re
import time

from conftest import ADMIN, ADMIN_KEY, API_KEY, AUTH, CHAT, MESSAGES, MODEL, RESPONSES, asked, chat
from fake_api import ApiReply
from fake_site import Reply, make_jwt

import k2proxy

TOKENS = [make_jwt(time.time() + 3600, "good"), make_jwt(time.time() + 3600, "dead")]
CONTROL = re.compile("[\x00-\x1f\x7f\u2028\u2029]")  # what a log line must not hold


def test_every_key_is_compared_in_constant_time(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b
    monkeypatch.setattr(k2proxy.hmac, "compare_digest", spy)
    assert k2proxy.matching_key("sk-a", ["sk-a", "sk-b", "sk-c"]) == "sk-a"
    assert len(calls) == 3, "matching the first key must not skip the others"
    calls.clear()
    assert k2proxy.matching_key("sk-x", ["sk-a", "sk-b"]) is None
    assert len(calls) == 2


async def test_keys_and_tokens_never_reach_the_logs(make_proxy, fake, tmp_path, caplog):
    caplog.set_level("DEBUG")
    (tmp_path / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    proxy = await make_proxy(PROXY_MODE="user", LOG_LEVEL="DEBUG")
    fake.by_token[TOKENS[1]] = Reply(status=401, body='{"detail": "expired"}')
    wrong = "sk-wrong-but-secret-looking"
    for stream in (False, True):
        for _ in range(2):
            await proxy.post("/v1/chat/completions", json=chat(stream=stream), headers=AUTH)
    await proxy.post("/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {wrong}"})
    await proxy.get("/admin/tokens/content", headers=ADMIN)
    await proxy.get("/admin/status", headers={"Authorization": f"Bearer {wrong}"})
    await proxy.post("/admin/tokens/update", json={"tokens": TOKENS}, headers=ADMIN)
    await proxy.post("/admin/switch_mode", json={"mode": "guest"}, headers=ADMIN)
    assert "/v1/chat/completions" in caplog.text
    for secret in [API_KEY, ADMIN_KEY, wrong, *TOKENS]:
        assert secret not in caplog.text


async def test_chunked_upload_over_the_limit_is_413(make_proxy, fake):
    proxy = await make_proxy(MAX_REQUEST_MB="0.05")

    async def chunks():
        yield b'{"model": "IFM/K2-Horizon-375B-A23B", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}]}'
    response = await proxy.post("/v1/chat/completions", data=chunks(),
                                headers={**AUTH, "Content-Type": "application/json"})
    assert response.status == 413 and (await response.json())["error"]["code"] == "request_too_large"
    assert fake.received == []


async def test_admin_page_paths_cannot_read_other_files(proxy):
    source = (k2proxy.HERE / "k2proxy.py").read_text()
    for path in ["/admin/../k2proxy.py", "/admin/..%2fk2proxy.py", "/admin%2f..%2fk2proxy.py", "/k2proxy.py",
                 "/admin.html/../k2proxy.py", "/admin/../../../../etc/passwd", "/admin/%2e%2e/README.md",
                 "/admin//etc/passwd", "/admin/admin.html"]:
        response = await proxy.get(path, headers=ADMIN)
        text = await response.text()
        assert "def main" not in text and "root:x:" not in text and "# k2proxy" not in text, path
        if response.status >= 400:
            assert json.loads(text)["error"]["message"]
    assert source.startswith("#!")


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


async def test_a_site_error_page_with_a_credential_is_summarised_without_it(make_proxy, fake, tmp_path, caplog):
    token = make_jwt(time.time() + 3600)
    (tmp_path / "tokens.txt").write_text(token + "\n")
    proxy = await make_proxy(PROXY_MODE="user", MAX_RETRIES="0")
    caplog.set_level(logging.INFO, logger="k2proxy")
    fake.reply = Reply(status=400, body="Bad request\nheaders were:\nAuthorization: Bearer " + token + "\n" * 50,
                       content_type="text/plain")
    response = await proxy.post(MESSAGES, json=asked(MESSAGES), headers=AUTH)
    message = (await response.json())["error"]["message"]
    assert response.status == 400 and "Bad request headers were" in message and "\n" not in message
    assert token not in message and token not in caplog.text


async def test_an_api_upstream_that_echoes_its_key_shows_it_to_nobody(api_proxy, fake_api, caplog):
    key = "zz-plain-secret-0042"  # looks like no known kind of key: only knowing it was sent finds it
    jwt = make_jwt(time.time() + 3600)
    proxy = await api_proxy(key=key)
    caplog.set_level(logging.INFO, logger="k2proxy")
    fake_api.reply = ApiReply(status=400, error_message=f"the key {key} may not do that\nAuthorization: Bearer {key}"
                                                        f"\ncookie token={jwt}\n" + "padding " * 200)
    response = await proxy.post(CHAT, json=chat(), headers=AUTH)
    message = (await response.json())["error"]["message"]
    assert response.status == 400 and "the key" in message and "[redacted]" in message
    assert key not in message and jwt not in message and "\n" not in message
    assert len(message) < len("upstream answered HTTP 400 invalid_request_error: ") + k2proxy.ERROR_TEXT_CHARS + 1
    stats = await (await proxy.get("/admin/ifm-keys/stats", headers=ADMIN)).text()
    assert key not in caplog.text and jwt not in caplog.text and key not in stats


async def test_control_characters_from_clients_cannot_forge_log_lines(proxy, fake, caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    await proxy.post("/v1/chat/completions", json=chat(model="m\nFORGED 200 OK"), headers=AUTH)
    await proxy.post("/v1/chat%0AFORGED", json=chat(), headers=AUTH)
    tools = [{"type": "web\nFORGED", "name": "x"}]
    await proxy.post("/v1/messages", json={"model": MODEL, "max_tokens": 10, "tools": tools,
                                           "messages": [{"role": "user", "content": "hi"}]}, headers=AUTH)
    assert not any(line.startswith("FORGED") for line in caplog.text.splitlines())
    assert "m\\nFORGED" in caplog.text


async def test_control_characters_a_client_chose_are_escaped_in_every_log_line(proxy, fake, caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    await proxy.post(RESPONSES, json=asked(RESPONSES, model="k2\r\nFORGED 200 OK\u2028x"), headers=AUTH)
    await proxy.post(MESSAGES, json={**asked(MESSAGES), "model": "k2\nFORGED"}, headers=AUTH)
    await proxy.post("/v1/messages%0D%0AFORGED", json=asked(MESSAGES), headers=AUTH)
    await proxy.get("/v1/models/k2%0AFORGED", headers=AUTH)
    await proxy.post(RESPONSES, json=asked(RESPONSES, tools=[{"type": "web_search\nFORGED"}]), headers=AUTH)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "FORGED" in m]) >= 5
    assert [m for m in messages if CONTROL.search(m)] == []
    assert "k2\\r\\nFORGED 200 OK\\u2028x" in caplog.text
