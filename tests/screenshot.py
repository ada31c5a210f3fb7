#!/usr/bin/env python3
"""Makes docs/admin.png from a real run: `python tests/screenshot.py` (needs Debian's chromium and playwright)."""

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.async_api import async_playwright

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from conftest import free_port, wait_for_port  # noqa: E402
from fake_upstream import make_jwt  # noqa: E402

KEY, ADMIN_KEY = "sk-screenshot-0123456789", "admin-screenshot-0123456789"


def post(url, body, key):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


async def shoot(base, out):
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        page = await chromium.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(base + "/admin")
        await page.fill("#admin-key", ADMIN_KEY)
        await page.press("#admin-key", "Enter")
        await page.wait_for_selector("#requests-body tr", timeout=10000)
        await page.screenshot(path=str(out), full_page=True)
        await chromium.close()


def main():
    work = Path(tempfile.mkdtemp())
    tokens = [make_jwt(time.time() + hours * 3600, f"acc-{hours}") for hours in (5, 9, 30)]
    (work / "tokens.txt").write_text("".join(token + "\n" for token in tokens))
    (work / "api_keys.txt").write_text("alice:sk-alice-0123456789 rpm=30\nbob:sk-bob-0123456789 concurrent=2\n")
    fake_port, port = free_port(), free_port()
    processes = [subprocess.Popen([sys.executable, str(HERE / "fake_upstream.py"), "--port", str(fake_port)])]
    try:
        wait_for_port(fake_port, processes[0])
        processes.append(subprocess.Popen([sys.executable, str(ROOT / "k2proxy.py")], cwd=work, env={
            **os.environ, "PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": KEY, "ADMIN_KEY": ADMIN_KEY,
            "PROXY_MODE": "user", "K2THINK_BASE_URL": f"http://127.0.0.1:{fake_port}"}))
        wait_for_port(port, processes[1])
        base = f"http://127.0.0.1:{port}"
        chat = {"model": "IFM/K2-Horizon-375B-A23B", "messages": [{"role": "user", "content": "Hi"}]}
        for key in ("sk-alice-0123456789", "sk-bob-0123456789", KEY) * 4:
            post(base + "/v1/chat/completions", chat, key)
        post(base + "/v1/chat/completions", {**chat, "model": "unknown"}, KEY)
        asyncio.run(shoot(base, ROOT / "docs" / "admin.png"))
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
