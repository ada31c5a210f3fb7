"""Docker, without a Docker engine: the files say what the image does, and what they promise is tried here."""

import fnmatch
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import ROOT, free_port

DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = (ROOT / "docker-compose.yml").read_text()


def instruction(name):
    """The arguments of every Dockerfile instruction called `name`, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.split(None, 1)[:1] == [name]]


def healthcheck_command():
    return json.loads(instruction("HEALTHCHECK")[0].split("CMD", 1)[1])


def test_dockerfile_builds_a_small_non_root_image():
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-(alpine|slim)[\w.-]*", instruction("FROM")[0].strip())
    assert instruction("USER") == ["k2proxy"]
    assert "adduser -D -H -u 10001" in DOCKERFILE
    assert instruction("EXPOSE") == ["8001"]
    assert json.loads(instruction("CMD")[-1]) == ["python", "k2proxy.py"]
    assert "PYTHONUNBUFFERED=1" in instruction("ENV")[0]
    assert [c.split() for c in instruction("COPY")] == [["requirements.txt", "."], ["k2proxy.py", "admin.html", "./"]]
    installs = [found.strip() for run in instruction("RUN") for found in re.findall(r"pip install[^&]*", run)]
    assert installs == ["pip install --no-cache-dir -r requirements.txt"]
    assert not re.search(r"\b(curl|wget|gcc|build-base|build-essential|apk add)\b", DOCKERFILE)
    assert healthcheck_command()[0] == "python"


def run_healthcheck(port):
    command = healthcheck_command()
    return subprocess.run([sys.executable, *command[1:]], env={"PORT": str(port)}, capture_output=True,
                          timeout=20).returncode


def test_healthcheck_passes_against_a_running_proxy_and_fails_against_a_stopped_one(spawn, tmp_path):
    port = free_port()
    proxy = spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path,
                  env={"PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": "sk-x"})
    assert run_healthcheck(port) == 0
    proxy.terminate()
    proxy.wait(10)
    assert run_healthcheck(port) != 0


def docker_ignored(path):
    """Whether Docker leaves `path` out of the build context (.dockerignore: last matching rule wins)."""
    ignored = False
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated, pattern = rule.startswith("!"), rule.lstrip("!")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_secrets_and_junk_out():
    for secret in (".env", "tokens.txt", "tokens_guest.txt", "accounts.txt", ".git/config", "tests/test_api.py",
                   "__pycache__/k2proxy.cpython-312.pyc", ".pytest_cache/v", "test-artifacts/admin.png", "data/tokens.txt"):
        assert docker_ignored(secret), secret
    for needed in ("k2proxy.py", "admin.html", "requirements.txt"):
        assert not docker_ignored(needed), needed


def test_compose_file():
    for line in ('"8001:8001"', "env_file: .env", "./data:/data", "restart: unless-stopped", "healthcheck:",
                 "stop_grace_period: 10s"):
        assert line in COMPOSE, line
    assert re.search(r"test: \[\"CMD\", \"python\", \"-c\", .*/health", COMPOSE)
    assert "USER_TOKENS_FILE=/data/tokens.txt" in DOCKERFILE, "token files live on the mounted volume"


def test_sigterm_ends_streams_and_exits_cleanly(spawn, tmp_path):
    source, work = tmp_path / "src", tmp_path / "work"
    source.mkdir()
    work.mkdir()
    for name in ("k2proxy.py", "admin.html"):
        shutil.copy(ROOT / name, source / name)
        (source / name).chmod(0o444)
    source.chmod(0o555)
    upstream_port, port = free_port(), free_port()
    spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(upstream_port)], upstream_port)
    urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{upstream_port}/_fake/reply", method="POST",
        data=json.dumps({"reasoning": "x" * 2000, "answer": "done", "piece": 5, "delay": 0.02}).encode()), timeout=5)
    proxy = spawn([str(source / "k2proxy.py")], port, cwd=work, env={
        "PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": "sk-x",
        "K2THINK_BASE_URL": f"http://127.0.0.1:{upstream_port}"})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST", headers={
        "Authorization": "Bearer sk-x", "Content-Type": "application/json"}, data=json.dumps(
        {"model": "MBZUAI-IFM/K2-Think", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode())
    lines, first = [], threading.Event()

    def read():
        with urllib.request.urlopen(request, timeout=30) as response:
            for line in response:
                lines.append(line.decode().strip())
                first.set()
    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(10)
    started = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(10) == 0
    reader.join(10)
    assert time.monotonic() - started < 10
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
