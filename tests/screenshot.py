#!/usr/bin/env python3
"""Makes docs/admin.png from a real run: `python tests/screenshot.py` (needs playwright and /usr/bin/chromium)."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from playwright.async_api import async_playwright, expect

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from fake_site import make_jwt  # noqa: E402

KEY, ADMIN_KEY = "sk-screenshot-0123456789", "admin-screenshot-0123456789"
ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"
MODEL = "IFM/K2-Horizon-375B-A23B"
OUT = ROOT / "docs" / "admin.png"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args, port, cwd, log, env=None):
    """A process of `args` (run by this Python), once it listens on `port`; its output goes to `log`."""
    process = subprocess.Popen([sys.executable, *args], cwd=cwd, env={**os.environ, **(env or {})},
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[0]} did not start; its output is in {log.name}") from None
            time.sleep(0.05)


def post(url, body, key):
    """The status of a POST of `body` as JSON with `key`."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def traffic(base):
    """A few minutes' worth of use: three clients, a client over its limit, a model that does not exist."""
    url, chat = base + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    statuses = [post(url, chat, key) for key in (ALICE, BOB, KEY) * 4]
    statuses.append(post(url, {**chat, "stream": True}, KEY))
    statuses.append(post(url, chat, ALICE))  # alice's fifth request this minute: rpm=4 refuses it
    statuses.append(post(url, {**chat, "model": "IFM/unknown"}, KEY))
    assert statuses == [200] * 13 + [429, 404], statuses
    return len(statuses)


async def shoot(base, requests, work):
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        page = await chromium.new_page(viewport={"width": 1280, "height": 900}, color_scheme="light")
        await page.goto(base + "/admin")
        await page.fill("#admin-key", ADMIN_KEY)
        await page.press("#admin-key", "Enter")
        await expect(page.locator("#count-total")).to_have_text("3", timeout=10000)
        await expect(page.locator("#requests-body tr")).to_have_count(requests, timeout=10000)
        await expect(page.locator("#keys-body tr")).to_have_count(2)
        await expect(page.locator("#tokens-editor")).not_to_have_value("", timeout=10000)
        await expect(page.locator("#live")).to_contain_text("Live")
        shown = await page.evaluate("document.body.innerText + document.getElementById('tokens-editor').value")
        assert str(work) not in shown and "/tmp/" not in shown, "the page shows a temporary path"
        await page.screenshot(path=str(OUT), full_page=True)
        await chromium.close()


def main():
    with tempfile.TemporaryDirectory() as work, open(Path(work) / "processes.log", "w") as log:
        work = Path(work)
        tokens = [make_jwt(time.time() + hours * 3600, f"acc-{hours}") for hours in (5, 9, 30)]
        (work / "tokens.txt").write_text("".join(token + "\n" for token in tokens))
        (work / "api_keys.txt").write_text(f"# team keys\nalice:{ALICE} rpm=4\nbob:{BOB} concurrent=2\n")
        for name in ("tokens.txt", "api_keys.txt"):
            (work / name).chmod(0o600)
        fake_port, port = free_port(), free_port()
        processes = []
        try:
            processes.append(start([str(HERE / "fake_upstream.py"), "--port", str(fake_port), "--site", "k2horizon"],
                                   fake_port, work, log))
            processes.append(start([str(ROOT / "k2proxy.py")], port, work, log, env={
                "PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": KEY, "ADMIN_KEY": ADMIN_KEY,
                "PROXY_MODE": "user", "K2THINK_BASE_URL": f"http://127.0.0.1:{fake_port}"}))
            base = f"http://127.0.0.1:{port}"
            asyncio.run(shoot(base, traffic(base), work))
        except BaseException:
            log.flush()
            sys.stderr.write((work / "processes.log").read_text())
            raise
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
