"""The admin page in a real browser (Debian's Chromium driven by Playwright), and how it is served."""

import asyncio
import json
import re
import time
import urllib.error
import urllib.request

import playwright.async_api as playwright
import pytest
from conftest import (
    ADMIN,
    ADMIN_KEY,
    ALICE,
    AUTH,
    E2E_ADMIN_KEY,
    MODEL,
    POOL_TOKENS,
    ROOT,
    chat,
    free_port,
    need_program,
)
from fake_site import Reply

import k2proxy

ARTIFACTS = ROOT / "test-artifacts"
KEYS_FILE = f"# team keys\nalice:{ALICE} rpm=2\n"
HOSTILE = "<script>window.hacked = 1</script><img src=x onerror='window.hacked=2'>"
IFM_REFUSED = "IFM-0123456789abcdef-refused-rfd"
IFM_SPENT = "IFM-fedcba9876543210-spent-spt"
IFM_NEW = "sk-ifm-0a1b2c3d4e5f6a7b-new-nwk"
IFM_OVER_SSH = "IFM-99887766554433-over-ssh-ssh"
IFM_KEYS_TEXT = f"# IFM keys\n{IFM_REFUSED}\n{IFM_SPENT}\n"


@pytest.fixture(scope="session")
def chromium():
    """Debian's Chromium; missing, a skip (in CI a failure) naming the install command, not a launch traceback."""
    return need_program("chromium", "apt-get install -y chromium", "/usr/bin/chromium")


@pytest.fixture
async def browser(chromium):
    async with playwright.async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield chromium
        await chromium.close()


@pytest.fixture
async def site(make_proxy, tmp_path, fake):
    (tmp_path / "tokens.txt").write_text("# team pool\n" + "\n".join(POOL_TOKENS) + "\n")
    (tmp_path / "api_keys.txt").write_text(KEYS_FILE)
    proxy = await make_proxy(PROXY_MODE="user", API_KEYS_FILE=tmp_path / "api_keys.txt")
    proxy.tokens_file = tmp_path / "tokens.txt"
    proxy.keys_file = tmp_path / "api_keys.txt"
    return proxy


@pytest.fixture
async def api_site(make_proxy, tmp_path, fake_api):
    """A proxy that asks IFM's API first (the site when no key is usable), with a refused key and a good one."""
    (tmp_path / "ifm_keys.txt").write_text(IFM_KEYS_TEXT)
    fake_api.refused = {IFM_REFUSED}
    proxy = await make_proxy(UPSTREAM="api,site", IFM_BASE_URL=fake_api.url + "/v1",
                             IFM_KEYS_FILE=tmp_path / "ifm_keys.txt")
    proxy.ifm_keys_file = tmp_path / "ifm_keys.txt"
    return proxy


async def open_page(browser, site, width=1280, scheme="light", height=900, **context):
    page = await browser.new_page(viewport={"width": width, "height": height}, color_scheme=scheme, **context)
    await page.goto(str(site.make_url("/admin")))
    return page


async def log_in(page, key=ADMIN_KEY):
    await page.fill("#admin-key", key)
    await page.press("#admin-key", "Enter")


async def dashboard(browser, site):
    """A page logged in, showing the three tokens."""
    page = await open_page(browser, site)
    await log_in(page)
    await text_of(page, "#count-total", "3")
    return page


async def text_of(page, selector, expected):
    await playwright.expect(page.locator(selector)).to_have_text(expected, timeout=8000)


async def test_key_prompt_first_and_no_data_before_the_key(browser, site):
    page = await browser.new_page()
    api_calls = []
    page.on("request", lambda request: "/admin/" in request.url and api_calls.append(request.url))
    await page.goto(str(site.make_url("/admin")))
    await playwright.expect(page.locator("#admin-key")).to_be_visible()
    assert await page.locator("#admin-key").get_attribute("type") == "password"
    html = await page.content()
    assert all(token[-3:] not in html and token[:12] not in html for token in POOL_TOKENS)
    assert api_calls == []


async def test_wrong_key_is_refused(browser, site):
    page = await open_page(browser, site)
    await log_in(page, "not-the-key")
    await playwright.expect(page.locator("#login-error")).to_be_visible(timeout=8000)
    await playwright.expect(page.locator("#admin-key")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('k2proxy_admin_key')") is None


async def test_counts_polling_actions_and_screenshots(browser, site, fake):
    page = await open_page(browser, site)
    await log_in(page)
    await text_of(page, "#mode", "user")
    await text_of(page, "#count-total", "3")
    await text_of(page, "#count-active", "3")
    await playwright.expect(page.locator("#tokens-body tr")).to_have_count(3)
    await page.evaluate("window.notReloaded = true")

    await site.post("/v1/chat/completions", json=chat(), headers=AUTH)
    await text_of(page, "#stat-requests", "1")
    assert await page.evaluate("window.notReloaded") is True, "figures must update without a reload"

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "admin-desktop.png"), full_page=True)

    await page.click("#load-tokens")
    await playwright.expect(page.locator("#flash")).to_contain_text("Loaded", timeout=8000)  # no load still on its way
    await playwright.expect(page.locator("#tokens-editor")).to_have_value(
        "# team pool\n" + "\n".join(POOL_TOKENS) + "\n")
    await page.fill("#tokens-editor", f"# team pool\n{POOL_TOKENS[0]}\n")
    await page.click("#save-tokens")
    await playwright.expect(page.locator("#flash")).to_contain_text("Saved", timeout=8000)
    assert site.tokens_file.read_text() == f"# team pool\n{POOL_TOKENS[0]}\n"
    await text_of(page, "#count-total", "1")

    fake.reply = Reply(status=401, body=json.dumps({"detail": "expired"}))
    await site.post("/v1/chat/completions", json=chat(), headers=AUTH)
    await playwright.expect(page.locator("#tokens-body")).to_contain_text("401", timeout=8000)
    await page.click(".reset-one[data-index='0']")
    await playwright.expect(page.locator("#flash")).to_contain_text("reset", timeout=8000)
    stats = await (await site.get("/admin/tokens/stats", headers=ADMIN)).json()
    assert stats["tokens"][0]["failures"] == 0

    await page.click("#mode-guest")
    await text_of(page, "#mode", "guest")
    status = await (await site.get("/admin/status", headers=ADMIN)).json()
    assert status["mode"] == "guest" and status["upstream_url"].endswith("/api/guest/chat/completions")

    await page.click("#logout")
    await playwright.expect(page.locator("#admin-key")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('k2proxy_admin_key')") is None


async def test_the_last_hour_the_requests_and_the_keys(browser, site, fake):
    alice = {"Authorization": "Bearer " + ALICE}
    for _ in range(2):
        assert (await site.post("/v1/chat/completions", json=chat(), headers=alice)).status == 200
    assert (await site.post("/v1/chat/completions", json=chat(), headers=alice)).status == 429
    fake.script = [Reply(status=500, body="down")] * 3
    assert (await site.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 502
    page = await dashboard(browser, site)

    await playwright.expect(page.locator("#about")).to_have_text(
        re.compile(rf"^v{re.escape(k2proxy.__version__)} · up \d+ s · {re.escape(MODEL)}"))
    rows = page.locator("#requests-body tr")
    await playwright.expect(rows).to_have_count(4, timeout=8000)
    await playwright.expect(rows.nth(0)).to_contain_text("502")
    await playwright.expect(rows.nth(1)).to_contain_text("rate_limited")
    await playwright.expect(rows.nth(2)).to_contain_text("alice")
    assert await page.locator("#requests-body tr.failed").count() == 2
    bars = {kind: await page.locator(f"#chart-requests rect.bar-{kind} title").all_text_contents()
            for kind in ("ok", "client", "bad")}
    assert {kind: sum(int(re.search(r": (\d+) \D+$", title)[1]) for title in titles) for kind, titles in bars.items()} \
        == {"ok": 2, "client": 1, "bad": 1}, "a bar a minute for each kind, stacked, its count in its title"
    assert await page.locator("#chart-latency circle.dot-p50").count() >= 1

    await playwright.expect(page.locator("#keys-body tr")).to_have_count(1)
    await page.click("#add-key")
    await page.fill("#keys-body tr:nth-child(2) input[aria-label=\"New key's name\"]", "bob")
    new_key = await page.input_value("#keys-body tr:nth-child(2) input[aria-label='New key']")
    await page.fill("#keys-body tr:nth-child(2) input[aria-label='Requests per minute']", "5")
    await page.click("#save-keys")
    await playwright.expect(page.locator("#flash")).to_contain_text("Saved 2 keys", timeout=8000)
    assert site.keys_file.read_text() == f"{KEYS_FILE}bob:{new_key} rpm=5\n"
    await playwright.expect(page.locator("#keys-body")).to_contain_text("bob")
    assert new_key not in await page.content() and ALICE not in await page.content()
    bob = {"Authorization": "Bearer " + new_key}
    assert (await site.post("/v1/chat/completions", json=chat(), headers=bob)).status == 200
    bob_row = page.locator("#keys-body tr[data-name='bob']")
    await playwright.expect(bob_row.locator("td[data-label='Requests']")).to_have_text("1", timeout=8000)
    await playwright.expect(bob_row.locator("td[data-label='Errors']")).to_have_text("0")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.click("#flash")
    await playwright.expect(page.locator("#flash")).to_be_hidden()
    await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=str(ARTIFACTS / "admin-monitoring.png"), full_page=True)


async def test_keys_edited_on_the_page_and_on_the_server(browser, site):
    page = await dashboard(browser, site)
    await playwright.expect(page.locator("#keys-body tr")).to_have_count(1)
    await page.click("#keys-body tr:first-child .reset-one")
    await page.click("#save-keys")
    await playwright.expect(page.locator("#flash")).to_contain_text("Saved 0 keys", timeout=8000)
    assert site.keys_file.read_text() == "# team keys\n"
    await playwright.expect(page.locator("#keys-body")).to_contain_text("No named keys")
    await page.click("#flash")  # the first save's message goes, so that the wait below sees the second save's
    await playwright.expect(page.locator("#flash")).to_be_hidden()
    await page.click("#save-keys")
    await playwright.expect(page.locator("#flash")).to_contain_text("Saved 0 keys", timeout=8000)

    site.keys_file.write_text(KEYS_FILE)
    await playwright.expect(page.locator("#keys-body")).to_contain_text("alice", timeout=8000)
    await page.fill("#keys-body tr:first-child input[aria-label='Requests per minute']", "7")
    site.keys_file.write_text(KEYS_FILE + "carol:sk-carol-0123456789\n")
    await page.click("#save-keys")
    await playwright.expect(page.locator("#flash")).to_contain_text("changed since it was loaded", timeout=8000)
    await page.click("#load-keys")
    await playwright.expect(page.locator("#keys-body tr")).to_have_count(2, timeout=8000)
    await playwright.expect(page.locator("#keys-body")).to_contain_text("carol")


async def test_hostile_values_render_as_text(browser, site, fake):
    site.tokens_file.write_text(HOSTILE.replace("\n", "") + "\n")
    await site.post("/admin/tokens/reload", headers=ADMIN)
    fake.reply = Reply(status=401, body=json.dumps({"detail": HOSTILE.replace("= 1", "= 3")}))  # not the token:
    # an error that quotes the token back is shown with the token blanked out
    await site.post("/v1/chat/completions", json=chat(), headers=AUTH)
    page = await open_page(browser, site)
    await log_in(page)
    await playwright.expect(page.locator("#tokens-body")).to_contain_text("<script>window.hacked", timeout=8000)
    await page.click("#load-tokens")
    await playwright.expect(page.locator("#tokens-editor")).to_have_value(HOSTILE + "\n", timeout=8000)
    assert await page.evaluate("window.hacked") is None


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_phone_width_has_no_horizontal_scroll(browser, site, scheme):
    page = await open_page(browser, site, width=360, scheme=scheme)
    await log_in(page)
    await playwright.expect(page.locator("#tokens-body tr")).to_have_count(3, timeout=8000)
    widths = await page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], f"page is {widths[0]} px wide in a {widths[1]} px viewport"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"admin-phone-{scheme}.png"), full_page=True)


async def test_page_headers(site):
    response = await site.get("/admin")
    assert response.status == 200 and response.content_type == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "script-src 'sha256-" in csp, "only the page's own script may run"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    page = await response.text()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page, "no outside resources"


@pytest.mark.parametrize("broken", ["directory", "not-utf8"])
async def test_an_unreadable_page_is_a_404_and_the_api_still_serves(make_proxy, tmp_path, monkeypatch, caplog, broken):
    page = tmp_path / "site" / "admin.html"
    page.parent.mkdir()
    page.mkdir() if broken == "directory" else page.write_bytes(b"<html>\xff\xfe</html>")
    monkeypatch.setattr(k2proxy, "HERE", page.parent)
    proxy = await make_proxy()
    response = await proxy.get("/admin")
    assert response.status == 404 and "admin.html" in (await response.json())["error"]["message"]
    assert "the admin page is off" in caplog.text
    assert (await proxy.get("/admin/status", headers=ADMIN)).status == 200


async def test_page_path_is_configurable_and_found_from_any_directory(spawn, tmp_path):
    port = free_port()
    spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path, env={
        "PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": "sk-x", "ADMIN_PAGE_PATH": "/admin/panel"})
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/panel", timeout=5).read().decode()
    assert "admin-key" in page
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/admin/panel", data=b"{}"), timeout=5)
    assert refused.value.code == 401, "only reading the page is public"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/admin", timeout=5)
    assert missing.value.code == 404


async def test_accounts_are_listed_with_status_and_next_sign_in(browser, make_proxy, fake, tmp_path):
    fake.accounts["ann@example.com"] = "pw-ann-secret"
    (tmp_path / "accounts.txt").write_text("ann@example.com:pw-ann-secret\nbob@example.com:pw-bob-wrong\n")
    site = await make_proxy(PROXY_MODE="user", ACCOUNTS_FILE=tmp_path / "accounts.txt", SIGNIN_INTERVAL=0.01)
    page = await open_page(browser, site)
    await log_in(page)
    rows = page.locator("#accounts-body tr")
    await playwright.expect(rows).to_have_count(2, timeout=8000)
    await playwright.expect(rows.nth(0)).to_contain_text("signed in", timeout=8000)
    await playwright.expect(rows.nth(1)).to_contain_text("wrong password", timeout=8000)
    html = await page.content()
    assert "pw-ann-secret" not in html and "pw-bob-wrong" not in html


async def test_buttons_are_disabled_while_their_request_is_in_flight(browser, site):
    page = await dashboard(browser, site)
    release = asyncio.Event()

    async def hold(route):
        await asyncio.wait_for(release.wait(), 10)
        await route.continue_()
    await page.route("**/admin/tokens/reset-all", hold)
    await page.click("#reset-all")
    await playwright.expect(page.locator("#reset-all")).to_be_disabled()
    release.set()
    await playwright.expect(page.locator("#reset-all")).to_be_enabled(timeout=8000)
    await playwright.expect(page.locator("#flash")).to_contain_text("reset", timeout=8000)


def answer_error(status, message):
    """A route handler that answers every request with an OpenAI error."""
    body = json.dumps({"error": {"message": message, "type": "x", "param": None, "code": None}})
    return lambda route: route.fulfill(status=status, content_type="application/json", body=body)


async def test_server_error_messages_are_shown(browser, site):
    page = await dashboard(browser, site)
    await page.route("**/admin/tokens/reload", answer_error(400, "Token file is unreadable"))
    await page.click("#reload")
    await playwright.expect(page.locator("#flash")).to_contain_text("Token file is unreadable", timeout=8000)
    await playwright.expect(page.locator("#flash")).to_have_class(re.compile(r"\berror\b"))


async def test_a_file_edited_on_the_server_is_not_overwritten(browser, site):
    page = await open_page(browser, site)
    await log_in(page)
    await playwright.expect(page.locator("#tokens-editor")).to_have_value(re.compile("team pool"), timeout=8000)
    site.tokens_file.write_text(f"# team pool\n{POOL_TOKENS[0]}\nadded-over-ssh\n")
    await page.fill("#tokens-editor", f"# team pool\n{POOL_TOKENS[1]}\n")
    await page.click("#save-tokens")
    await playwright.expect(page.locator("#flash")).to_contain_text("changed since it was loaded", timeout=8000)
    assert "added-over-ssh" in site.tokens_file.read_text()

    await page.click("#load-tokens")
    await playwright.expect(page.locator("#flash")).to_contain_text("Loaded", timeout=8000)  # no load still on its way
    await playwright.expect(page.locator("#tokens-editor")).to_have_value(re.compile("added-over-ssh"))
    await page.fill("#tokens-editor", f"# team pool\n{POOL_TOKENS[1]}\nadded-over-ssh\n")
    await page.click("#save-tokens")
    await playwright.expect(page.locator("#flash")).to_contain_text("Saved", timeout=8000)
    assert site.tokens_file.read_text() == f"# team pool\n{POOL_TOKENS[1]}\nadded-over-ssh\n"

    await page.click("#reload")
    await playwright.expect(page.locator("#flash")).to_contain_text("Reloaded 2 tokens", timeout=8000)


async def test_a_key_refused_mid_session_returns_to_the_prompt(browser, site):
    page = await dashboard(browser, site)
    await page.route("**/admin/**", answer_error(401, "Invalid admin key"))
    await page.click("#reset-all")
    await playwright.expect(page.locator("#admin-key")).to_be_visible(timeout=8000)
    assert await page.evaluate("sessionStorage.getItem('k2proxy_admin_key')") is None


async def test_check_upstream_shows_the_report_and_the_hint_of_each_failure(browser, site, fake):
    page = await dashboard(browser, site)
    fake.reply = Reply(status=403, content_type="text/html", body="<title>Just a moment...</title>")
    await page.click("#check-upstream")
    await playwright.expect(page.locator("#check-report")).to_be_visible(timeout=8000)
    await text_of(page, "#check-verdict", "Chat does not work in user mode")
    failed = page.locator("#check-lines li.check-failed")
    await playwright.expect(failed).to_have_count(2)
    await playwright.expect(failed.first).to_contain_text("✗")
    await playwright.expect(failed.first.locator(".check-hint")).to_contain_text("open http")
    await playwright.expect(page.locator("#check-lines li.check-ok").first).to_contain_text("host")
    fake.reply = Reply()
    await page.click("#check-upstream")
    await text_of(page, "#check-verdict", re.compile(r"^Chat works in user mode · the answer speaks the 2026 site"))
    await playwright.expect(page.locator("#check-lines li.check-failed")).to_have_count(0)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "admin-check.png"), full_page=True)


async def test_the_editor_warns_of_a_line_that_is_not_a_jwt(browser, site):
    page = await dashboard(browser, site)
    await page.click("#load-tokens")
    await playwright.expect(page.locator("#flash")).to_contain_text("Loaded", timeout=8000)  # no load still on its way
    await page.fill("#tokens-editor", f"{POOL_TOKENS[0]}\nsomething-pasted-wrong\n")
    await page.click("#save-tokens")
    await playwright.expect(page.locator("#flash")).to_contain_text("line 2", timeout=8000)
    await playwright.expect(page.locator("#flash")).to_contain_text("not a JWT")
    assert site.tokens_file.read_text() == f"{POOL_TOKENS[0]}\nsomething-pasted-wrong\n"


def ifm_row(page, key):
    """The row of the IFM keys table that shows `key` by its mask."""
    return page.locator("#ifm-keys-body tr").filter(
        has=page.locator("td[data-label='Key']", has_text=k2proxy.mask_token(key)))


async def whole_keys_shown(page, keys):
    """The whole keys the page holds anywhere but in the IFM keys editor: its markup, its text, its other fields."""
    shown = await page.evaluate("""() => [document.documentElement.outerHTML, document.body.innerText,
        ...[...document.querySelectorAll("input, textarea")].filter((field) => field.id !== "ifm-editor")
            .map((field) => field.value)].join("\\n")""")
    return [key for key in keys if key in shown]


async def test_ifm_keys_show_their_state_budget_and_rest_and_a_reset_readmits_one(browser, api_site, fake_api):
    assert (await api_site.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    page = await open_page(browser, api_site, locale="en-GB", timezone_id="Asia/Dubai")
    await log_in(page)
    await playwright.expect(page.locator("#ifm-panel")).to_be_visible(timeout=8000)
    await text_of(page, "#ifm-base-url", fake_api.url + "/v1")
    await playwright.expect(page.locator("#upstream-order")).to_contain_text("api (IFM keys), then site")
    await playwright.expect(page.locator("#ifm-keys-body tr")).to_have_count(2)
    refused, spent = ifm_row(page, IFM_REFUSED), ifm_row(page, IFM_SPENT)
    await playwright.expect(refused.locator(".badge")).to_have_text("disabled")
    await playwright.expect(refused.locator("td[data-label='Last error']")).to_contain_text("refused")
    await playwright.expect(spent.locator(".badge")).to_have_text("active")
    await playwright.expect(spent.locator("td[data-label='Budget left']")).to_have_text(
        f"{fake_api.daily_budget - fake_api.daily_used[IFM_SPENT]:,}")

    fake_api.daily_budget = fake_api.daily_used[IFM_SPENT] + 1
    assert (await api_site.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    await playwright.expect(spent.locator(".badge")).to_have_text("cooling", timeout=8000)
    in_dubai = time.gmtime((int(time.time()) // 86400 + 1) * 86400 + 4 * 3600)  # the next 00:00 UTC, local time
    await playwright.expect(spent.locator("td[data-label='Status']")).to_contain_text(
        f"rested until {in_dubai.tm_mday} {time.strftime('%b %Y', in_dubai)}, 04:00")
    await playwright.expect(spent.locator("td[data-label='Budget left']")).to_have_text("0")
    await playwright.expect(spent.locator("td[data-label='Tokens today']")).to_have_text(
        f"{fake_api.daily_used[IFM_SPENT]:,}")
    await playwright.expect(spent.locator("td[data-label='Requests']")).to_have_text("2")
    await playwright.expect(refused.locator("td[data-label='Errors']")).to_have_text("1")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "admin-ifm-keys.png"), full_page=True)

    await refused.locator("button.reset-one").click()
    await playwright.expect(page.locator("#flash")).to_contain_text("IFM key 0 reset", timeout=8000)
    await playwright.expect(refused.locator(".badge")).to_have_text("active", timeout=8000)
    await playwright.expect(spent.locator(".badge")).to_have_text("cooling")
    await playwright.expect(page.locator("#ifm-editor")).to_have_value(IFM_KEYS_TEXT)
    assert await whole_keys_shown(page, [IFM_REFUSED, IFM_SPENT]) == []


async def test_the_ifm_keys_file_is_edited_on_the_page_and_a_file_changed_meanwhile_is_kept(browser, api_site):
    page = await open_page(browser, api_site)
    await log_in(page)
    editor = page.locator("#ifm-editor")
    await playwright.expect(editor).to_have_value(IFM_KEYS_TEXT, timeout=8000)
    await playwright.expect(page.locator("#ifm-keys-body tr")).to_have_count(2)
    await editor.fill(f"# IFM keys\n{IFM_SPENT}\n{IFM_NEW}\n")
    await playwright.expect(page.locator("#ifm-editor-dirty")).to_be_visible()
    await page.click("#save-ifm-keys")
    await playwright.expect(page.locator("#flash")).to_contain_text("Saved 2 IFM keys", timeout=8000)
    assert api_site.ifm_keys_file.read_text() == f"# IFM keys\n{IFM_SPENT}\n{IFM_NEW}\n"
    await playwright.expect(page.locator("#ifm-editor-dirty")).to_be_hidden()
    await playwright.expect(page.locator("#ifm-keys-body td[data-label='Key']")).to_have_text(
        [k2proxy.mask_token(IFM_SPENT), k2proxy.mask_token(IFM_NEW)], timeout=8000)
    assert await whole_keys_shown(page, [IFM_REFUSED, IFM_SPENT, IFM_NEW]) == []

    changed_over_ssh = f"# IFM keys\n{IFM_SPENT}\n{IFM_NEW}\n{IFM_OVER_SSH}\n"
    api_site.ifm_keys_file.write_text(changed_over_ssh)
    await editor.fill(f"# IFM keys\n{IFM_NEW}\n")
    await page.click("#save-ifm-keys")
    await playwright.expect(page.locator("#flash")).to_contain_text("changed since it was loaded", timeout=8000)
    await playwright.expect(page.locator("#ifm-changed")).to_be_visible()
    assert api_site.ifm_keys_file.read_text() == changed_over_ssh
    await page.click("#ifm-load-again")
    await playwright.expect(editor).to_have_value(changed_over_ssh, timeout=8000)
    await playwright.expect(page.locator("#ifm-changed")).to_be_hidden()
    await playwright.expect(page.locator("#ifm-keys-body tr")).to_have_count(3, timeout=8000)
    assert await whole_keys_shown(page, [IFM_SPENT, IFM_NEW, IFM_OVER_SSH]) == []

    await page.click("#logout")
    await playwright.expect(page.locator("#admin-key")).to_be_visible()
    await playwright.expect(editor).to_have_value("")


async def test_the_ifm_section_shows_when_the_api_may_serve_or_keys_are_held(browser, make_proxy, tmp_path):
    site_only = await make_proxy(UPSTREAM="site", IFM_KEYS_FILE=tmp_path / "no_ifm_keys.txt")
    page = await open_page(browser, site_only)
    await log_in(page)
    await text_of(page, "#mode", "guest")
    await playwright.expect(page.locator("#ifm-panel")).to_be_hidden()

    (tmp_path / "ifm_keys.txt").write_text(f"{IFM_SPENT}\n")
    keys_held = await make_proxy(UPSTREAM="site", IFM_KEYS_FILE=tmp_path / "ifm_keys.txt")
    page = await open_page(browser, keys_held)
    await log_in(page)
    await playwright.expect(page.locator("#ifm-panel")).to_be_visible(timeout=8000)
    await playwright.expect(page.locator("#upstream-order")).to_contain_text("these keys are not used")
    await playwright.expect(page.locator("#ifm-keys-body td[data-label='Key']")).to_have_text(
        k2proxy.mask_token(IFM_SPENT))


async def test_the_ifm_section_fits_a_phone(browser, api_site):
    assert (await api_site.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    page = await open_page(browser, api_site, width=360)
    await log_in(page)
    await playwright.expect(page.locator("#ifm-keys-body tr")).to_have_count(2, timeout=8000)
    await playwright.expect(page.locator("#ifm-editor")).to_have_value(IFM_KEYS_TEXT, timeout=8000)
    widths = await page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], f"page is {widths[0]} px wide in a {widths[1]} px viewport"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "admin-ifm-phone.png"), full_page=True)


# ─── What a newcomer met: where the admin key comes from, a switch that cannot serve, a long list on a phone ──

async def test_the_sign_in_text_names_the_admin_key_and_its_defaults(browser, site):
    """The prompt says which key it wants: ADMIN_KEY, else VALID_API_KEY's first, else the kept generated key."""
    page = await open_page(browser, site)
    intro = page.locator("#login-intro")
    await playwright.expect(intro).to_be_visible()
    await playwright.expect(intro).to_contain_text(  # a string: its whitespace and the page's are normalised
        "admin key: the value of ADMIN_KEY. When ADMIN_KEY is not set, it is the first key of VALID_API_KEY. "
        "When neither is set, it is the key generated at the first start and kept in the file GENERATED_KEY_FILE "
        "(default k2proxy_key.txt in the proxy's working directory), which the start-up line prints.")


async def test_without_admin_key_the_first_key_of_valid_api_key_signs_in(browser, make_proxy):
    """What the sign-in text says holds: with ADMIN_KEY unset, VALID_API_KEY's first key is the admin key."""
    site = await make_proxy(ADMIN_KEY="", VALID_API_KEY="sk-first-0123456789,sk-second-0123456789")
    page = await open_page(browser, site)
    await log_in(page, "sk-second-0123456789")
    await playwright.expect(page.locator("#login-error")).to_be_visible(timeout=8000)
    await log_in(page, "sk-first-0123456789")
    await text_of(page, "#mode", "guest")


async def test_without_any_key_set_the_key_kept_in_k2proxy_key_txt_signs_in(browser, spawn, tmp_path):
    """With neither key set, the key generated into k2proxy_key.txt, in the working directory, signs in."""
    port = free_port()
    process = spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path,
                    env={"PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": "", "ADMIN_KEY": ""})
    kept = (tmp_path / "k2proxy_key.txt").read_text().strip()
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{port}/admin")
    await log_in(page, kept)
    await text_of(page, "#mode", "guest")
    process.terminate()
    _, start_up = process.communicate(timeout=10)
    assert "kept in k2proxy_key.txt" in start_up and f"\n  {kept}\n" in start_up, "the start-up line prints it"


async def test_a_switch_to_user_mode_that_cannot_serve_shows_its_warning_until_dismissed(browser, make_proxy):
    """An empty user pool: the switch's warning shows as a failure and stays, also with unsaved edits."""
    site = await make_proxy()  # guest mode, and no user tokens
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.clock.install()  # the flash's timer is run forward, not waited for
    await page.goto(str(site.make_url("/admin")))
    await log_in(page)
    await text_of(page, "#mode", "guest")
    flash = page.locator("#flash")

    await page.click("#mode-user")
    await text_of(page, "#mode", "user")
    await playwright.expect(flash).to_have_text(
        re.compile(r"^Switched to user mode; but no request can be served now: \S"), timeout=8000)
    await playwright.expect(flash).to_have_class(re.compile(r"\berror\b"))
    await page.clock.fast_forward(60_000)
    await playwright.expect(flash).to_be_visible()
    await playwright.expect(flash).to_contain_text("no request can be served now")
    await flash.click()
    await playwright.expect(flash).to_be_hidden()

    await page.click("#mode-guest")  # a plain success, for comparison: it goes by itself
    await playwright.expect(flash).to_have_text("Switched to guest mode", timeout=8000)
    await playwright.expect(flash).not_to_have_class(re.compile(r"\berror\b"))
    await page.clock.fast_forward(7000)
    await playwright.expect(flash).to_be_hidden()

    await page.fill("#tokens-editor", "# edits not saved yet\n")
    await page.click("#mode-user")
    await playwright.expect(flash).to_contain_text("no request can be served now", timeout=8000)
    await playwright.expect(flash).to_contain_text("unsaved edits")
    await playwright.expect(flash).to_have_class(re.compile(r"\berror\b"))
    await page.clock.fast_forward(60_000)
    await playwright.expect(flash).to_contain_text("no request can be served now")


async def test_fifty_requests_on_a_phone_leave_the_tokens_within_two_screens(monkeypatch, browser, make_proxy,
                                                                             tmp_path):
    """At 360 px the request list is a box of its own, so 50 requests do not push the Tokens section away."""
    monkeypatch.chdir(tmp_path)  # the default file names, as a user has them (the Proxy section shows them)
    (tmp_path / "tokens.txt").write_text("\n".join(POOL_TOKENS) + "\n")
    site = await make_proxy(PROXY_MODE="user", USER_TOKENS_FILE="tokens.txt", GUEST_TOKENS_FILE="tokens_guest.txt")
    for _ in range(50):
        assert (await site.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    page = await open_page(browser, site, width=360, height=740)
    await log_in(page)
    requests = page.locator("#requests-body tr")
    await playwright.expect(requests).to_have_count(50, timeout=8000)
    await playwright.expect(page.locator("#tokens-body tr")).to_have_count(3)
    tokens_top, screen = await page.evaluate("""() => [document.getElementById("tokens-title").closest("section")
        .getBoundingClientRect().top + window.scrollY, window.innerHeight]""")
    assert tokens_top < 2 * screen, f"the Tokens section starts {tokens_top:.0f} px down, below two {screen} px screens"
    widths = await page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], f"page is {widths[0]} px wide in a {widths[1]} px viewport"

    await requests.nth(49).scroll_into_view_if_needed()  # the oldest is still there, at the end of the list's box
    await playwright.expect(requests.nth(49)).to_be_in_viewport()
    still_top = await page.evaluate("""() => document.getElementById("tokens-title").closest("section")
        .getBoundingClientRect().top + window.scrollY""")
    assert still_top == tokens_top
    ARTIFACTS.mkdir(exist_ok=True)
    await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=str(ARTIFACTS / "admin-phone-requests.png"), full_page=True)


# ─── Replicas sharing one Redis: which replicas the page sees, and which one served each request ──

HOUR, DAY = 3600, 86400
FLEET = [  # as /admin/status lists them with REDIS_URL set: in order of start, this one marked
    {"name": "vps-a:101", "uptime_s": 2 * DAY + 4 * HOUR + 30, "this": False, "started": 1, "seen": 2,
     "version": "0.9.0"},
    {"name": "vps-a:102", "uptime_s": 3 * HOUR + 12 * 60 + 5, "this": True, "started": 1, "seen": 2,
     "version": k2proxy.__version__},
    {"name": "vps-b:7", "uptime_s": 45, "this": False, "started": 1, "seen": 2, "version": k2proxy.__version__}]


def answer_changed(change):
    """A route handler that answers with what the proxy answered, as `change` leaves its JSON."""
    async def handle(route):
        response = await route.fetch()
        await route.fulfill(response=response, json=change(await response.json()))
    return handle


async def fleet_page(browser, site, replicas, replica=None, width=1280):
    """A page signed in to `site` whose status lists `replicas`, and whose log names `replica` as each request's."""
    page = await open_page(browser, site, width=width)
    await page.route("**/admin/status", answer_changed(lambda status: {**status, "replicas": replicas}))
    if replica:
        await page.route(re.compile(r"/admin/requests(\?|$)"), answer_changed(
            lambda log: {"requests": [{**entry, "replica": replica} for entry in log["requests"]]}))
    await log_in(page)
    return page


async def test_a_single_process_without_redis_shows_no_replicas_and_no_replica_column(browser, site):
    """The default: the page as it was before replicas, although the status lists this process."""
    status = await (await site.get("/admin/status", headers=ADMIN)).json()
    assert [sorted(seen) for seen in status["replicas"]] == [["name", "this", "uptime_s"]]
    assert (await site.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    page = await dashboard(browser, site)
    await playwright.expect(page.locator("#requests-body tr")).to_have_count(1, timeout=8000)
    await playwright.expect(page.locator("#requests-body td[data-label='Key']")).to_have_text("VALID_API_KEY")
    for hidden in ("#replicas-term", "#replicas", "#replica-head"):
        await playwright.expect(page.locator(hidden)).to_be_hidden()
    await playwright.expect(page.locator("#requests-body td[data-label='Replica']")).to_have_count(0)
    await text_of(page, "#requests-hint", "the newest first; errors marked")
    shown = await page.inner_text("#dashboard")
    assert "Replica" not in shown and "this one" not in shown


async def test_several_replicas_are_listed_with_their_uptime_and_this_one_marked(browser, site):
    assert (await site.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    page = await fleet_page(browser, site, FLEET, replica="vps-b:7")
    await playwright.expect(page.locator("#replicas-term")).to_be_visible(timeout=8000)
    await playwright.expect(page.locator("#replicas li")).to_have_text([
        "vps-a:101 up 2 d 4 h v0.9.0",  # versions that differ (an upgrade under way) are shown
        f"vps-a:102 up 3 h 12 min v{k2proxy.__version__} this one",
        f"vps-b:7 up 45 s v{k2proxy.__version__}"])
    await playwright.expect(page.locator("#replicas")).to_contain_text("the request log is every replica's")

    await playwright.expect(page.locator("#replica-head")).to_be_visible()
    await playwright.expect(page.locator("#requests-body td[data-label='Replica']")).to_have_text(["vps-b:7"])
    await text_of(page, "#requests-hint", "every replica's, the newest first; errors marked")
    headers = await page.locator("#requests-body").locator("xpath=..").locator("th:visible").all_text_contents()
    assert headers[:3] == ["Time", "Replica", "Key"]
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "admin-replicas.png"), full_page=True)


async def test_replicas_and_the_replica_of_a_request_fit_a_phone(browser, site):
    assert (await site.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    fleet = [{**seen, "name": seen["name"].replace("vps", "a-rather-long-kubernetes-pod-name-7f9c4d")}
             for seen in FLEET]
    page = await fleet_page(browser, site, fleet, replica=fleet[2]["name"], width=360)
    await playwright.expect(page.locator("#replicas li")).to_have_count(3, timeout=8000)
    field = page.locator("#requests-body td[data-label='Replica']")
    await playwright.expect(field).to_have_text(fleet[2]["name"], timeout=8000)
    await playwright.expect(field).to_be_visible()
    widths = await page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], f"page is {widths[0]} px wide in a {widths[1]} px viewport"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "admin-replicas-phone.png"), full_page=True)


async def test_one_replica_with_redis_is_shown_as_such(browser, site):
    """REDIS_URL set, no other replica yet (its entry has "seen"): the page says which one it sees."""
    page = await fleet_page(browser, site, [FLEET[1]])
    await playwright.expect(page.locator("#replicas li")).to_have_text(
        ["vps-a:102 up 3 h 12 min this one"], timeout=8000)
    await playwright.expect(page.locator("#replica-head")).to_be_hidden()


async def test_a_real_fleet_shows_both_replicas_and_which_one_served_each_request(browser, replicas):
    """Two `python k2proxy.py` processes sharing a real redis-server: each one's page lists both, marks itself,
    and its log names the replica of each request."""
    fleet = replicas()
    for number in (1, 0):
        assert fleet.call(number, "POST", "/v1/chat/completions", chat())[0] == 200
    names = [seen["name"] for seen in fleet.admin(0, "GET", "/admin/status")[1]["replicas"]]
    assert len(names) == 2
    for number in (0, 1):
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(fleet.urls[number] + "/admin")
        await log_in(page, E2E_ADMIN_KEY)
        await playwright.expect(page.locator("#replicas li")).to_have_text(
            [re.compile(f"^{re.escape(name)} up \\d+ (s|min)" + (" this one$" if this == number else "$"))
             for this, name in enumerate(names)], timeout=8000)
        await playwright.expect(page.locator("#requests-body td[data-label='Replica']")).to_have_text(
            names, timeout=8000)  # the newest first: replica 0 served the second request
        await page.close()
