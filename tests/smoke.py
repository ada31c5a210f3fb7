"""A smoke test of `python k2proxy.py` as a process, with whatever Python and packages run this script: what CI runs
in a fresh virtual environment holding the lowest versions the requirements files allow (their floors), so that a
floor that is too low fails CI. Standard library only on the client's side; exit status 0 when every step works.

    python tests/smoke.py
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import pdfs  # noqa: E402

KEY = "sk-smoke-0123456789"
DEADLINE = 20  # seconds a process has to listen


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def started(command, port, **env):
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, cwd=env.get("CWD"))
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[1]} exited: {process.stderr.read().decode()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"{command[1]} did not listen within {DEADLINE} s")


def post(port, path, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json", "anthropic-version": "2023-06-01"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read().decode()


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def checks(port):
    """(what was asked, whether the answer held what it should) of each step."""
    report = pdfs.pdf(["Smoke report", "It works."])
    file_part = {"type": "file", "file": {"filename": "smoke.pdf", "file_data": "data:application/pdf;base64,"
                                          + base64.b64encode(report).decode()}}
    hello = [{"role": "user", "content": "Hi"}]
    yield "chat", post(port, "/v1/chat/completions", {"model": "IFM/K2-Horizon-375B-A23B", "messages": hello})
    yield "chat, streamed", post(port, "/v1/chat/completions", {"model": "IFM/K2-Horizon-375B-A23B",
                                                                "messages": hello, "stream": True})
    yield "messages", post(port, "/v1/messages", {"model": "claude-opus-4-8", "max_tokens": 100, "messages": hello})
    yield "responses", post(port, "/v1/responses", {"model": "IFM/K2-Horizon-375B-A23B", "input": "Hi"})
    yield "a PDF", post(port, "/v1/chat/completions", {"model": "IFM/K2-Horizon-375B-A23B", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Read it."}, file_part]}]})


def main():
    work = Path(tempfile.mkdtemp(prefix="k2proxy-smoke-"))
    fake_port, proxy_port = free_port(), free_port()
    processes = [started([sys.executable, str(ROOT / "tests" / "fake_upstream.py"), "--port", str(fake_port)],
                         fake_port)]
    redis = shutil.which("redis-server")
    env = {"PORT": str(proxy_port), "HOST": "127.0.0.1", "VALID_API_KEY": KEY, "CWD": str(work),
           "K2THINK_BASE_URL": f"http://127.0.0.1:{fake_port}"}
    if redis:
        redis_port = free_port()
        processes.append(started([redis, "--port", str(redis_port), "--save", "", "--appendonly", "no"], redis_port))
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    failed = []
    try:
        processes.append(started([sys.executable, str(ROOT / "k2proxy.py")], proxy_port, **env))
        for name, (status, _) in checks(proxy_port):
            print(f"{'ok' if status == 200 else 'FAILED'}: {name} (HTTP {status})")
            if status != 200:
                failed.append(name)
        health = get(proxy_port, "/health")
        print(f"health: {health['status']}" + (f", redis {health.get('redis')}" if redis else ", no redis-server"))
        if health["status"] != "ok":
            failed.append("/health")
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    versions = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    print("with:", ", ".join(line for line in versions.split() if line.split("==")[0].lower() in
                              ("aiohttp", "redis", "pypdf")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
