"""`python k2proxy.py --check` and POST /admin/check: one test per situation an operator meets, each asserting the
report's verdicts and hints; exit codes; the JSON form (read by `head` too); no secret anywhere."""

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ADMIN, ADMIN_KEY, API_KEY, MODEL, ROOT, free_port, run_check
from fake_site import AUTH_EXPIRED, OLD_MODEL, Reply, make_jwt

import k2proxy

TOKEN = make_jwt(time.time() + 3600, "acc-check")


@pytest.fixture
def check(proxy_settings, fake, tmp_path):
    """Runs the check against the fake with these settings; the report, as JSON."""
    async def run(tokens=(), accounts=(), **env):
        (tmp_path / "tokens.txt").write_text("".join(t + "\n" for t in tokens))
        (tmp_path / "accounts.txt").write_text("".join(a + "\n" for a in accounts))
        settings = proxy_settings(ACCOUNTS_FILE=tmp_path / "accounts.txt", **env)
        return await run_check(settings)
    return run


def probes(report):
    return {probe["name"]: probe for probe in report["probes"]}


async def test_the_2026_site_healthy(check, fake):
    report = await check(tokens=[TOKEN], PROXY_MODE="user")
    found = probes(report)
    assert report["works"] and "2026 site" in report["dialect"]
    assert [found[name]["verdict"] for name in ("host", "models", "guest chat", "user chat")] == ["ok"] * 4
    assert found["sign-in"]["verdict"] == "skipped"
    chat = found["user chat"]["details"]
    assert chat["status"] == 200 and chat["content_type"] == "text/event-stream"
    assert chat["text_forms"] == "snapshots"
    assert {"content", "task_id"} <= set(chat["frame_fields"]) and chat["ended"]
    assert chat["answer"] == fake.reply.answer and chat["reasoning"] == fake.reply.reasoning
    assert "reasoning markup: <details>; no <answer> tags" in found["user chat"]["summary"]
    efforts = [r.body["extra_body"]["chat_template_kwargs"]["reasoning_effort"] for r in fake.received]
    assert efforts[:2] == ["low", "low"], "the chats ask for little thinking"
    assert found["effort field"]["details"]["read"] == ["extra_body"], "the fake's template reads extra_body only"


async def test_the_older_sites_dialect_still_works_and_is_named(aiohttp_server, check, fake):
    fake.site, fake.models, fake.reply = "k2think", [{"id": OLD_MODEL}], Reply(markup="tags", form="choices",
                                                                                task_id=False, end="[DONE]",
                                                                                ragged=False)
    report = await check(MODELS=OLD_MODEL)
    chat = probes(report)["guest chat"]
    assert report["works"] and "older site" in report["dialect"]
    assert "<answer> tags" in chat["summary"] and "reasoning markup: <think>" in chat["summary"]


async def test_a_renamed_model_says_which_ids_to_set(check, fake):
    fake.models = [{"id": "IFM/K2-Horizon-2"}, {"id": "IFM/K2-Horizon-2-mini"}]
    report = await check(tokens=[TOKEN], PROXY_MODE="user")
    found = probes(report)
    assert not report["works"]
    assert found["models"]["verdict"] == "failed"
    assert found["models"]["hint"] == "set MODELS=IFM/K2-Horizon-2,IFM/K2-Horizon-2-mini"
    assert found["user chat"]["details"]["problem"] == "model not found" and MODEL in found["user chat"]["hint"]


@pytest.mark.parametrize("situation,reply,problem,hint", [
    ("bot check", Reply(status=403, content_type="text/html", body="<title>Just a moment...</title>"),
     "a bot-check or maintenance page", "open http"),
    ("task id only", Reply(body='{"status": true, "task_id": "t-1"}'), "a websocket-only task_id answer",
     "protocol has changed"),
    ("empty stream", Reply(reasoning="", answer="", markup="plain"), "an empty answer", "still served"),
    ("stream cut", Reply(reasoning="x" * 300, piece=5, drop_after=10), "a stream cut before its end",
     "connection broke"),
])
async def test_a_broken_answer_is_named_with_what_to_do(check, fake, situation, reply, problem, hint):
    fake.reply = reply
    report = await check()
    chat = probes(report)["guest chat"]
    assert not report["works"] and chat["verdict"] == "failed"
    assert chat["details"]["problem"] == problem and hint in chat["hint"]


@pytest.mark.parametrize("reply", [Reply(answer=""), Reply(answer="", realtime_save=True)],
                         ids=["snapshots", "realtime"])
async def test_an_answer_that_is_reasoning_only_fails_the_check_saying_what_came(check, fake, reply):
    """A reasoning block and nothing after it is no working chat: ✗, with the reasoning it did hold."""
    fake.reply = reply
    report = await check()
    chat = probes(report)["guest chat"]
    assert not report["works"] and chat["verdict"] == "failed" and chat["details"]["problem"] == "an empty answer"
    assert "reasoning only" in chat["summary"] and fake.reply.reasoning[:40] in chat["summary"]
    assert chat["details"]["answer"] == ""


async def test_an_answer_after_an_effort_closer_is_the_answer_the_check_reads(check, fake):
    fake.reply = Reply(reasoning="Short.<ifm|think>\n\nIt works.", answer="")
    chat = probes(await check())["guest chat"]
    assert chat["verdict"] == "ok" and chat["details"]["answer"] == "It works."


@pytest.mark.parametrize("reply", [Reply(realtime_save=True, piece=3), Reply(batch=3), Reply(escaped=True),
                                   Reply(responses=True), Reply(extras=True)],
                         ids=["realtime save", "batched", "escaped", "responses", "extras"])
async def test_each_open_webui_configuration_passes_the_check_with_its_exact_answer(check, fake, reply):
    fake.reply = reply
    chat = probes(await check())["guest chat"]
    assert chat["verdict"] == "ok"
    assert (chat["details"]["reasoning"], chat["details"]["answer"]) == (reply.reasoning, reply.answer)


async def test_a_guest_endpoint_that_is_gone(check, fake):
    report = await check(GUEST_API_URL=fake.url + "/api/guest/v1/chat/completions")
    chat = probes(report)["guest chat"]
    assert chat["details"]["problem"] == "the chat endpoint is gone (HTTP 404)" and "GUEST_API_URL" in chat["hint"]


async def test_an_unreachable_host(check):
    report = await check(K2THINK_BASE_URL=f"http://127.0.0.1:{free_port()}")
    found = probes(report)
    assert found["host"]["verdict"] == "failed" and "connection failed" in found["host"]["summary"]
    assert "K2THINK_BASE_URL" in found["host"]["hint"] and not report["works"]
    assert all(found[name]["verdict"] == "skipped" for name in ("models", "guest chat", "user chat"))


async def test_an_upstream_that_never_answers_ends_within_its_timeout(check, fake):
    fake.reply = Reply(first_delay=30)
    report = await check(REQUEST_TIMEOUT="0.5")
    chat = probes(report)["guest chat"]
    assert chat["details"]["problem"] == "a timeout" and "REQUEST_TIMEOUT (0.5 s)" in chat["hint"]


async def test_an_expired_token_and_a_wrong_password(check, fake):
    fake.accounts["ann@example.com"] = "right-password"
    fake.by_token[TOKEN] = Reply(status=401, body=json.dumps(AUTH_EXPIRED))
    report = await check(tokens=[TOKEN], accounts=["ann@example.com:wrong-password"], PROXY_MODE="user")
    found = probes(report)
    assert found["sign-in ann@example.com"]["verdict"] == "failed"
    assert "wrong email or password" in found["sign-in ann@example.com"]["summary"]
    assert found["user chat"]["details"]["problem"] == "token refused" and "token file" in found["user chat"]["hint"]
    assert not report["works"]


async def test_an_account_that_signs_in_serves_the_user_chat(check, fake):
    fake.accounts["ann@example.com"] = "right-password"
    report = await check(accounts=["ann@example.com:right-password"], PROXY_MODE="user")
    found = probes(report)
    assert found["sign-in ann@example.com"]["verdict"] == "ok" and found["user chat"]["verdict"] == "ok"
    assert report["works"] and fake.signins[0][0] == "ann@example.com" and len(fake.signins) == 1


async def test_the_check_costs_a_few_tiny_requests_and_leaves_the_pool_alone(make_proxy, fake, tmp_path):
    (tmp_path / "tokens.txt").write_text(TOKEN + "\n")
    proxy = await make_proxy(PROXY_MODE="user")
    pool = proxy.server.app[k2proxy.STATE].site.pool
    fake.by_token[TOKEN] = Reply(status=500, body="down")
    first, second = await asyncio.gather(*(proxy.post("/admin/check", headers=ADMIN) for _ in range(2)))
    assert await first.json() == await second.json(), "a second asker gets the run under way"
    assert len(fake.received) == 2, "one chat per mode"
    assert all(len(json.dumps(r.body)) < 1000 for r in fake.received)
    assert (pool.credentials[0].failures, pool.credentials[0].requests, pool.credentials[0].last_error) == (0, 0, None)
    assert (await proxy.post("/admin/check")).status == 401


def run_cli(fake_port, *flags, **env):
    return subprocess.run([sys.executable, str(ROOT / "k2proxy.py"), "--check", *flags], capture_output=True,
                          text=True, timeout=60, cwd=ROOT / "tests", env={
                              "PATH": "", "VALID_API_KEY": API_KEY, "ADMIN_KEY": ADMIN_KEY, "REQUEST_TIMEOUT": "5",
                              "K2THINK_BASE_URL": f"http://127.0.0.1:{fake_port}", **env})


def test_exit_codes_and_the_json_form(spawn, tmp_path):
    port = free_port()
    spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(port)], port)
    works = run_cli(port)
    assert works.returncode == 0 and works.stdout.startswith("k2proxy ") and "✓ guest chat" in works.stdout
    assert works.stdout.rstrip().endswith("chat works in guest mode") and works.stderr == ""
    as_json = run_cli(port, "--json")
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and report["works"] and probes(report)["guest chat"]["verdict"] == "ok"
    broken = run_cli(port, "--json", MODELS="Retired/Model")
    assert broken.returncode == 1
    assert probes(json.loads(broken.stdout))["guest chat"]["details"]["problem"] == "model not found"
    text = run_cli(port, MODELS="Retired/Model").stdout
    assert "✗ guest chat  model not found" in text and "→ the site does not serve Retired/Model" in text
    assert run_cli(port, PORT="not-a-port").returncode == 2


def test_no_secret_in_the_report(spawn, tmp_path):
    port = free_port()
    spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(port)], port)
    (tmp_path / "tokens.txt").write_text(TOKEN + "\n")
    (tmp_path / "accounts.txt").write_text("ann@example.com:very-secret-password\n")
    outputs = []
    for flags in ((), ("--json",)):
        run = run_cli(port, *flags, PROXY_MODE="user", USER_TOKENS_FILE=str(tmp_path / "tokens.txt"),
                      ACCOUNTS_FILE=str(tmp_path / "accounts.txt"))
        outputs += [run.stdout, run.stderr]
    assert "sign-in ann@example.com" in outputs[0]
    for secret in (API_KEY, ADMIN_KEY, TOKEN, "very-secret-password"):
        assert all(secret not in output for output in outputs)


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
