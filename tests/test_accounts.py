"""Accounts and models: sign-in with email and password, fresh tokens, model discovery and aliases."""

import json
import time

import pytest
from conftest import ADMIN, AUTH, chat, state_of, until
from fake_site import AUTH_EXPIRED, Reply

import k2proxy

PASSWORDS = {"ann@example.com": "pa:ss-ann", "bob@example.com": "hunter2-bob"}
V2 = "IFM/K2-Horizon-375B-A23B-v2"


@pytest.fixture
def account_proxy(make_proxy, fake, tmp_path):
    async def start(lines, **env):
        fake.accounts.update(PASSWORDS)
        (tmp_path / "accounts.txt").write_text("\n".join(lines) + "\n")
        return await make_proxy(**{"PROXY_MODE": "user", "ACCOUNTS_FILE": tmp_path / "accounts.txt",
                                   "SIGNIN_INTERVAL": 0.01, "MODELS_REFRESH": 0.2, **env})
    return start


def account_tokens(proxy):
    return {t.account: t.value for t in state_of(proxy).site.pool.credentials if t.account}


def test_accounts_file_format():
    text = ('# mine\n\nann@example.com:pa:ss-ann\n{"email": "bob@example.com", "password": "p"}\n'
            'not an account\n{"email": 1}\n')
    assert k2proxy.parse_accounts_file(text) == ([("ann@example.com", "pa:ss-ann"), ("bob@example.com", "p")], [5, 6])


async def test_sign_in_fills_the_pool_and_serves_requests(account_proxy, fake):
    proxy = await account_proxy(["# accounts", "ann@example.com:pa:ss-ann",
                                 json.dumps({"email": "bob@example.com", "password": "hunter2-bob"})])
    await until(lambda: len(account_tokens(proxy)) == 2)
    issued = {email: token for email, token, _ in fake.signins}
    assert account_tokens(proxy) == issued
    for _ in range(2):
        assert (await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    assert {r.token for r in fake.received} == set(issued.values())
    accounts = (await (await proxy.get("/admin/accounts", headers=ADMIN)).json())["accounts"]
    assert {a["email"]: a["status"] for a in accounts} == {"ann@example.com": "signed_in",
                                                           "bob@example.com": "signed_in"}
    assert all(a["next_signin"] > time.time() + 60 for a in accounts)


async def test_wrong_password_disables_the_account(account_proxy, fake):
    proxy = await account_proxy(["ann@example.com:wrong", "bob@example.com:hunter2-bob"])
    await until(lambda: len(fake.signins) == 2 and account_tokens(proxy))
    assert [email for email, _, _ in fake.signins] == ["ann@example.com", "bob@example.com"]
    much_later = state_of(proxy).accounts.next_due(time.time() + 10 ** 6)
    assert much_later.email == "bob@example.com", "no retry of a wrong password, however long it waits"
    accounts = {a["email"]: a for a in (await (await proxy.get("/admin/accounts", headers=ADMIN)).json())["accounts"]}
    assert accounts["ann@example.com"]["status"] == "wrong_password"
    assert accounts["ann@example.com"]["next_signin"] is None
    assert "incorrect" in accounts["ann@example.com"]["last_error"]
    assert list(account_tokens(proxy)) == ["bob@example.com"]


async def test_token_only_in_the_cookie(account_proxy, fake):
    fake.signin_cookie_only = True
    proxy = await account_proxy(["ann@example.com:pa:ss-ann"])
    await until(lambda: fake.signins and account_tokens(proxy).get("ann@example.com") == fake.signins[0][1])


async def test_signs_in_again_before_the_token_expires(account_proxy, fake):
    fake.token_lifetime = 3
    proxy = await account_proxy(["ann@example.com:pa:ss-ann"])
    await until(lambda: len(fake.signins) >= 2, seconds=6)
    first, (_, second, renewed_at) = fake.signins[0][1], fake.signins[1]
    assert renewed_at < k2proxy.jwt_expiry(first), "the new sign-in must come before the old token expires"
    await until(lambda: account_tokens(proxy)["ann@example.com"] == second)


async def test_a_clock_ahead_of_upstream_does_not_idle_the_account(account_proxy, fake, caplog):
    """A token already expired by this machine's clock is used anyway, and renewed every 10 minutes."""
    fake.token_lifetime = -120
    proxy = await account_proxy(["ann@example.com:pa:ss-ann"])
    await until(lambda: account_tokens(proxy))
    assert (await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    account = state_of(proxy).accounts.accounts["ann@example.com"]
    assert 590 < account.next_signin - time.time() <= 600 and "clock" in caplog.text


async def test_signs_in_again_when_the_token_is_refused(account_proxy, fake):
    proxy = await account_proxy(["ann@example.com:pa:ss-ann"], MAX_RETRIES=0)
    await until(lambda: account_tokens(proxy))
    fake.by_token[fake.signins[0][1]] = Reply(status=401, body=json.dumps(AUTH_EXPIRED))
    assert (await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 502
    await until(lambda: len(fake.signins) == 2 and account_tokens(proxy)["ann@example.com"] == fake.signins[1][1])
    assert (await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    assert fake.received[-1].token == fake.signins[1][1]


@pytest.mark.parametrize("status", [503, 403], ids=["down", "blocked"])
async def test_failing_sign_in_backs_off(account_proxy, fake, status):
    """Only a refused password disables an account; a 403 may be a bot check in front of the site."""
    fake.signin_status = status
    proxy = await account_proxy(["ann@example.com:pa:ss-ann"])
    await until(lambda: fake.signins)
    accounts = state_of(proxy).accounts
    account = accounts.accounts["ann@example.com"]
    assert account.status == "failing" and 4 < account.next_signin - time.time() <= 5
    assert accounts.next_due(account.next_signin - 0.01) is None, "not before its backoff is over"
    assert accounts.next_due(account.next_signin) is account
    assert len(fake.signins) == 1


async def test_a_refused_token_whose_sign_in_fails_waits_out_the_backoff(account_proxy, fake):
    proxy = await account_proxy(["ann@example.com:pa:ss-ann"], MAX_RETRIES=0)
    await until(lambda: account_tokens(proxy))
    fake.by_token[fake.signins[0][1]] = Reply(status=401, body=json.dumps(AUTH_EXPIRED))
    fake.signin_status = 503
    assert (await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 502
    accounts = state_of(proxy).accounts
    account = accounts.accounts["ann@example.com"]
    await until(lambda: account.status == "failing")
    assert accounts.next_due(time.time()) is None, "the refusal was answered by a sign-in; now the backoff counts"
    assert accounts.next_due(account.next_signin) is account


async def test_accounts_file_is_watched(account_proxy, fake, tmp_path):
    proxy = await account_proxy(["ann@example.com:pa:ss-ann"])
    await until(lambda: account_tokens(proxy))
    (tmp_path / "accounts.txt").write_text("bob@example.com:hunter2-bob\n")
    await until(lambda: list(account_tokens(proxy)) == ["bob@example.com"])


async def test_passwords_appear_nowhere(account_proxy, fake, caplog):
    caplog.set_level("DEBUG")
    proxy = await account_proxy(["ann@example.com:pa:ss-ann", "bob@example.com:wrong-secret-pw"])
    await until(lambda: len(fake.signins) == 2)
    outputs = [caplog.text, repr(state_of(proxy).accounts.accounts)]
    for path in ("/admin/status", "/admin/accounts", "/admin/tokens/stats", "/admin/tokens/content"):
        outputs.append(await (await proxy.get(path, headers=ADMIN)).text())
    outputs.append(await (await proxy.get("/health")).text())
    for password in ("pa:ss-ann", "wrong-secret-pw"):
        assert all(password not in output for output in outputs)


async def test_models_follow_upstream(make_proxy, fake, tmp_path):
    (tmp_path / "tokens.txt").write_text("tok-1\n")
    fake.models = [{"id": V2, "name": "K2-Think-v2"}, {"id": "IFM/K2-Pilot", "name": "K2 Pilot"}]
    proxy = await make_proxy(PROXY_MODE="user", MODELS_REFRESH=0.1, MODEL_ALIASES=f"k2={V2}")

    async def listed():
        return [m["id"] for m in (await (await proxy.get("/v1/models", headers=AUTH)).json())["data"]]
    await until(lambda: state_of(proxy).models.source == "upstream")
    assert await listed() == [V2, V2 + "-nothink", "k2-horizon-375b-a23b-v2", "k2-horizon-375b-a23b-v2-nothink",
                              "IFM/K2-Pilot", "IFM/K2-Pilot-nothink", "k2-pilot", "k2-pilot-nothink"]
    fake.models_bare = True
    fake.models = [{"id": V2}]
    await until(lambda: state_of(proxy).models.ids == [V2])
    response = await proxy.post("/v1/chat/completions", json=chat(model="IFM/K2-Pilot"), headers=AUTH)
    error = (await response.json())["error"]
    assert response.status == 404 and error["code"] == "model_not_found" and V2 in error["message"]
    fake.reply = Reply(reasoning="hidden", answer="ok")
    for alias, reasoning in (("k2", "hidden"), ("k2-nothink", None)):
        body = await (await proxy.post("/v1/chat/completions", json=chat(model=alias), headers=AUTH)).json()
        assert body["model"] == alias and body["choices"][0]["message"].get("reasoning_content") == reasoning
        assert fake.received[-1].body["model"] == V2


async def test_models_are_fetched_as_soon_as_an_account_signs_in(account_proxy, fake):
    """With only accounts, no token exists at start-up; the list must not wait for the next refresh."""
    fake.models = [{"id": V2}]
    proxy = await account_proxy(["ann@example.com:pa:ss-ann"], MODELS_REFRESH=600)
    await until(lambda: state_of(proxy).models.source == "upstream")
    body = await (await proxy.get("/v1/models", headers=AUTH)).json()
    assert [m["id"] for m in body["data"]] == [V2, V2 + "-nothink", "k2-horizon-375b-a23b-v2",
                                              "k2-horizon-375b-a23b-v2-nothink"]


async def test_models_fall_back_to_the_setting(make_proxy, fake, tmp_path):
    (tmp_path / "tokens.txt").write_text("tok-1\n")
    fake.models = None
    proxy = await make_proxy(PROXY_MODE="user", MODELS_REFRESH=0.1, MODELS="IFM/K2-Horizon-375B-A23B,Other")
    assert await state_of(proxy).models.refresh() is False
    body = await (await proxy.get("/v1/models", headers=AUTH)).json()
    assert [m["id"] for m in body["data"]] == ["IFM/K2-Horizon-375B-A23B", "IFM/K2-Horizon-375B-A23B-nothink",
                                              "k2-horizon-375b-a23b", "k2-horizon-375b-a23b-nothink", "Other",
                                              "Other-nothink"]
    assert state_of(proxy).models.source == "MODELS"


@pytest.mark.parametrize("value", ["k2", "=x", "a=", "a=b,c"])
def test_bad_aliases_stop_start_up(value):
    with pytest.raises(k2proxy.SettingsError, match="MODEL_ALIASES"):
        k2proxy.load_settings({"MODEL_ALIASES": value})


async def test_sign_ins_are_counted_in_the_metrics_by_result(account_proxy, fake):
    proxy = await account_proxy(["ann@example.com:wrong", "bob@example.com:hunter2-bob"])
    await until(lambda: len(fake.signins) == 2 and account_tokens(proxy))
    metrics = await (await proxy.get("/metrics", headers=ADMIN)).text()
    assert 'k2proxy_signins_total{result="signed_in"} 1\n' in metrics
    assert 'k2proxy_signins_total{result="wrong_password"} 1\n' in metrics
    assert "hunter2" not in metrics and "bob@example.com" not in metrics
