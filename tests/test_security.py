"""Security: constant-time keys, secrets never logged, size limits on chunked uploads, no file reading."""

import json
import time

from conftest import ADMIN, ADMIN_KEY, API_KEY, AUTH, chat
from fake_upstream import Reply, make_jwt

import k2proxy

TOKENS = [make_jwt(time.time() + 3600, "good"), make_jwt(time.time() + 3600, "dead")]


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
