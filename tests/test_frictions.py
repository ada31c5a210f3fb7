"""What newcomers and real client libraries trip on: a wrong base path, an unreachable upstream, a key that changes
at every restart, noisy admin polling, structured output on /v1/responses, and the command line's rough edges."""

import json
import logging
import os
import signal
import stat
import subprocess
import sys

import openai
import pydantic
import pytest
from conftest import ADMIN, API_KEY, AUTH, MODEL, ROOT, chat, free_port, run_check
from fake_upstream import Reply

import k2proxy

# ─── Unknown routes say which route was meant ────────────────────────────────

@pytest.mark.parametrize("path,meant,advice", [
    ("/chat/completions", "POST /v1/chat/completions", "Put /v1 at the end of the client's base URL"),
    ("/v1/v1/messages", "POST /v1/messages", "remove /v1 from the base URL"),
    ("/v1/completions", "POST /v1/chat/completions", ""),
    ("/v1/message", "POST /v1/messages", ""),
])
async def test_an_unknown_route_names_the_route_meant(proxy, fake, path, meant, advice):
    response = await proxy.post(path, json=chat(), headers=AUTH)
    body = await response.json()
    message = body["error"]["message"]
    assert response.status == 404 and f"did you mean {meant}?" in message and advice in message
    assert fake.received == []


async def test_an_anthropic_client_with_v1_twice_gets_its_own_error_shape_and_the_hint(proxy):
    response = await proxy.post("/v1/v1/messages", json={}, headers=AUTH)
    body = await response.json()
    assert response.status == 404 and body["type"] == "error"
    assert "did you mean POST /v1/messages?" in body["error"]["message"]


async def test_a_path_like_no_route_gets_no_guess(proxy):
    body = await (await proxy.post("/nothing/here", json={}, headers=AUTH)).json()
    assert body["error"]["message"] == "Unknown route: POST /nothing/here"


# ─── An upstream that cannot be reached ──────────────────────────────────────

@pytest.fixture
def closed_port():
    """A loopback port nothing listens on: connections to it are refused."""
    return free_port()


async def test_an_unreachable_site_names_its_host_and_the_check_and_is_asked_once(make_proxy, closed_port, caplog):
    proxy = await make_proxy(K2THINK_BASE_URL=f"http://127.0.0.1:{closed_port}")
    caplog.set_level(logging.INFO, logger="k2proxy")
    response = await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    error = (await response.json())["error"]
    assert response.status == 502 and error["code"] == "upstream_unreachable"
    assert f"127.0.0.1:{closed_port}" in error["message"] and "python k2proxy.py --check" in error["message"]
    assert caplog.text.count("upstream attempt") == 1, "a refused connection is not tried again on the same endpoint"


async def test_health_turns_degraded_after_connection_failures_in_a_row(make_proxy, closed_port):
    proxy = await make_proxy(K2THINK_BASE_URL=f"http://127.0.0.1:{closed_port}")
    assert (await proxy.get("/health")).status == 200
    for _ in range(k2proxy.UNREACHABLE_DEGRADED):
        await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    response = await proxy.get("/health")
    body = await response.json()
    assert response.status == 503 and body["status"] == "degraded"
    assert f"127.0.0.1:{closed_port}" in body["reason"] and "--check" in body["reason"]


async def test_health_is_ok_again_once_upstream_answers(make_proxy, fake):
    proxy = await make_proxy()
    state = proxy.server.app[k2proxy.STATE]
    state.http.unreachable, state.http.unreachable_host = k2proxy.UNREACHABLE_DEGRADED, "gone.example"
    assert (await proxy.get("/health")).status == 503
    assert (await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)).status == 200
    assert (await proxy.get("/health")).status == 200


# ─── Logs: completions at INFO, the admin page's polling at DEBUG ────────────

async def test_admin_polling_logs_at_debug_and_completions_at_info(proxy, caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    for path in ("/admin/status", "/admin/tokens/stats", "/admin/requests", "/admin/history", "/health"):
        assert (await proxy.get(path, headers=ADMIN)).status == 200
    await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    lines = [record.getMessage() for record in caplog.records if record.levelno >= logging.INFO]
    assert not [line for line in lines if "/admin/" in line or "/health" in line]
    assert any(line.startswith("POST /v1/chat/completions") for line in lines)


async def test_a_refused_admin_request_is_still_logged_at_info(proxy, caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    assert (await proxy.get("/admin/status")).status == 401
    assert "GET /admin/status" in caplog.text


# ─── The generated key survives restarts ─────────────────────────────────────

def start_without_a_key(spawn, workdir):
    """`python k2proxy.py` with no VALID_API_KEY, in `workdir`; (the warning line, the key printed)."""
    port = free_port()
    process = spawn([str(ROOT / "k2proxy.py")], port, cwd=workdir,
                    env={"PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": ""})
    warning, key = process.stderr.readline(), process.stderr.readline().strip()
    process.send_signal(signal.SIGTERM)
    process.wait(10)
    return warning, key


def test_the_generated_key_is_kept_readable_by_its_owner_only_and_reused(spawn, tmp_path):
    first_warning, first = start_without_a_key(spawn, tmp_path)
    _, second = start_without_a_key(spawn, tmp_path)
    kept = tmp_path / "k2proxy_key.txt"
    assert first == second and first.startswith("sk-") and kept.read_text().strip() == first
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert "kept in k2proxy_key.txt" in first_warning


def test_shutdown_is_logged(spawn, tmp_path):
    port = free_port()
    process = spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path,
                    env={"PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": API_KEY})
    process.send_signal(signal.SIGTERM)
    process.wait(10)
    log = process.stderr.read()
    assert "k2proxy stopping" in log and "k2proxy stopped" in log


# ─── Structured output on /v1/responses, over the web site ───────────────────

class Weather(pydantic.BaseModel):
    city: str
    celsius: float


async def test_responses_parse_returns_the_model_object_over_the_site(proxy, fake):
    fake.reply = Reply(answer='Here it is: {"city": "Paris", "celsius": 18.5}')
    client = openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key=API_KEY, max_retries=0)
    parsed = await client.responses.parse(model=MODEL, input="Weather in Paris?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Paris", celsius=18.5)
    system = fake.received[-1].body["messages"][0]
    assert system["role"] == "system" and '"celsius"' in system["content"] and "JSON" in system["content"]


async def test_responses_json_object_without_json_in_the_answer_is_a_clear_error(proxy, fake):
    fake.reply = Reply(answer="No JSON today.")
    response = await proxy.post("/v1/responses", json={"model": MODEL, "input": "x",
                                                       "text": {"format": {"type": "json_object"}}}, headers=AUTH)
    assert response.status == 502 and (await response.json())["error"]["code"] == "invalid_json_output"


# ─── Smaller points ──────────────────────────────────────────────────────────

async def test_switching_to_user_mode_with_no_tokens_warns(proxy):
    body = await (await proxy.post("/admin/switch_mode", json={"mode": "user"}, headers=ADMIN)).json()
    assert body["ok"] and body["warnings"] and "No tokens" in body["warnings"][0]
    assert "no request can be served now" in body["message"]


async def test_the_root_lists_every_api_route(proxy):
    listed = (await (await proxy.get("/")).json())["endpoints"]
    api_routes = [f"{route.method} {route.path}" for route in k2proxy.ROUTES if route.path.startswith("/v1/")]
    assert set(api_routes) <= set(listed) and "GET /v1/responses/{id}" in listed


def test_help_names_every_client_api_and_upstream():
    result = subprocess.run([sys.executable, str(ROOT / "k2proxy.py"), "--help"], capture_output=True, text=True,
                            timeout=30)
    text = " ".join(result.stdout.split())
    assert "OpenAI chat completions, OpenAI Responses and Anthropic Messages" in text and "IFM's API" in text


def check_process(tmp_path, *flags, **env):
    """`python k2proxy.py --check` against nothing that answers, with stdout piped."""
    return subprocess.Popen([sys.executable, str(ROOT / "k2proxy.py"), "--check", *flags], cwd=tmp_path,
                            env={**os.environ, "VALID_API_KEY": API_KEY, "REQUEST_TIMEOUT": "2",
                                 "K2THINK_BASE_URL": f"http://127.0.0.1:{free_port()}", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_check_json_read_by_head_ends_without_a_traceback(tmp_path):
    process = check_process(tmp_path, "--json")
    process.stdout.readline()  # one line, then the reader goes away, as `| head -1` does
    process.stdout.close()
    assert process.wait(30) in (0, 1) and "Traceback" not in process.stderr.read()


async def test_check_in_user_mode_without_tokens_says_what_to_do(proxy_settings, fake, tmp_path):
    settings = proxy_settings(PROXY_MODE="user", ACCOUNTS_FILE=tmp_path / "accounts.txt")
    report = await run_check(settings)
    user = next(probe for probe in report["probes"] if probe["name"] == "user chat")
    assert user["verdict"] == "skipped" and "tokens.txt" in user["hint"] and "accounts.txt" in user["hint"]


async def test_check_of_an_unknown_model_in_guest_mode_names_the_default(proxy_settings, fake, tmp_path):
    settings = proxy_settings(MODELS="IFM/K2-Nope", ACCOUNTS_FILE=tmp_path / "accounts.txt")
    report = await run_check(settings)
    guest = next(probe for probe in report["probes"] if probe["name"] == "guest chat")
    assert guest["verdict"] == "failed" and MODEL in guest["hint"] and not report["works"]


def test_a_generated_key_file_that_cannot_be_written_gives_a_key_for_the_run(tmp_path, capsys):
    settings = k2proxy.load_settings({"GENERATED_KEY_FILE": str(tmp_path / "missing-dir" / "key.txt")},
                                     generate_key=k2proxy.kept_key)
    assert settings.valid_api_key[0].startswith("sk-") and "good for this run only" in capsys.readouterr().err
    assert json.dumps(settings.public()).count(settings.valid_api_key[0]) == 0
