"""What a newcomer met on the admin page, in Debian's Chromium: where the admin key comes from, a mode switch that
cannot serve, and a long request list on a phone."""

import playwright.async_api as playwright
from conftest import AUTH, chat
from test_admin_page import browser, chromium, log_in, open_page  # noqa: F401 (fixtures)


async def test_the_sign_in_text_says_where_the_admin_key_comes_from(browser, proxy):  # noqa: F811
    page = await open_page(browser, proxy)
    text = await page.locator("#login").inner_text()
    assert "ADMIN_KEY" in text and "VALID_API_KEY" in text and "k2proxy_key.txt" in text


async def test_switching_to_user_mode_with_no_tokens_shows_a_warning_that_stays(browser, proxy):  # noqa: F811
    page = await open_page(browser, proxy)
    await log_in(page)
    await page.click("#mode-user")
    flash = page.locator("#flash")
    await playwright.expect(flash).to_contain_text("no request can be served now", timeout=8000)
    assert "error" in (await flash.get_attribute("class") or "")


async def test_fifty_requests_leave_the_tokens_within_three_screens_on_a_phone(browser, proxy, fake):  # noqa: F811
    for _ in range(50):
        assert (await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    page = await open_page(browser, proxy, width=360)
    await log_in(page)
    await playwright.expect(page.locator("#requests-body tr")).to_have_count(50, timeout=8000)
    tokens_top = await page.evaluate("document.getElementById('tokens-body').getBoundingClientRect().top"
                                     " + window.scrollY")
    assert tokens_top < 3 * 900, f"the tokens start {tokens_top:.0f} px down, more than three screens"
