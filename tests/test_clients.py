"""The real client programs, from npm, run through the proxy as a user runs them: Claude Code on /v1/messages,
Codex CLI on /v1/responses.

They are looked for in .clis/ (where `.ci/run` installs them) and then on the PATH; without them their tests are
skipped, naming the install command (failed instead under K2PROXY_REQUIRE_PROGRAMS=1, as CI runs them)."""

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest
from conftest import E2E_KEY, MODEL, REQUIRE_PROGRAMS, ROOT, Pair, free_port, http_json, need_program

CLIS = Path(os.environ.get("K2PROXY_CLIS") or ROOT / ".clis" / "node_modules" / ".bin")  # CI: also the newest
INSTALL = "npm install --prefix .clis @anthropic-ai/claude-code@2.1.197 @openai/codex@0.169.0"
QUIET = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
         "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_MAX_RETRIES": "0"}


def cli(name):
    """The path of a client program; missing, a skip (in CI a failure) naming the install command."""
    return need_program(name, INSTALL, CLIS / name)


IFM_KEY = "IFM-e2e-0123456789abcdef"


class ApiPair(Pair):
    """The API fake (FakeIFM) and a proxy with UPSTREAM=api in front of it, both as processes."""

    def __init__(self, spawn, cwd):
        self.upstream_port, self.port = free_port(), free_port()
        spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(self.upstream_port), "--api"],
              self.upstream_port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = spawn([str(ROOT / "k2proxy.py")], self.port, cwd=cwd, env={
            "PORT": str(self.port), "HOST": "127.0.0.1", "VALID_API_KEY": E2E_KEY, "UPSTREAM": "api",
            "IFM_BASE_URL": f"http://127.0.0.1:{self.upstream_port}/v1", "IFM_API_KEY": IFM_KEY})

    def completions(self):
        """The chat completions the API fake received, in order."""
        return [record for record in self.received() if record["path"] == "/v1/chat/completions"]


@pytest.fixture
def api_pair(spawn, tmp_path):
    """Starts the API fake and a proxy with UPSTREAM=api as processes."""
    return lambda: ApiPair(spawn, tmp_path)


def assert_tool_loop_over_the_api(started, call, thought, marker):
    """Two completions in one session: the first answered by a call, the second carrying its result and reasoning."""
    first, second = started.completions()
    assert (first["status"], second["status"], first["key"]) == (200, 200, IFM_KEY)
    assert first["session_id"] and first["session_id"] == second["session_id"], "one X-Session-ID for the run"
    messages = second["body"]["messages"]
    called = next(m for m in messages if m["role"] == "assistant" and m.get("tool_calls"))
    assert [(made["function"]["name"], json.loads(made["function"]["arguments"]))
            for made in called["tool_calls"]] == [(call["name"], call["arguments"])]
    assert called["reasoning_content"] == thought, "the first turn's reasoning replayed verbatim"
    results = [m for m in messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in results] == [called["tool_calls"][0]["id"]]
    output = json.dumps(results[0]["content"])
    assert marker in output and f"echo {marker}" not in output, "the command's output, not the command"


def claude(started, tmp_path, prompt, *flags):
    """`claude -p` with a fresh HOME, no telemetry and no retries, pointed at the proxy."""
    home, work = tmp_path / "claude-home", tmp_path / "claude-work"
    home.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "TERM": "dumb", "ANTHROPIC_BASE_URL": started.url,
           "ANTHROPIC_AUTH_TOKEN": E2E_KEY, **QUIET}
    return subprocess.run([cli("claude"), "-p", prompt, *flags], env=env, cwd=work, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


def test_claude_code_answers_through_the_proxy(pair, tmp_path):
    started = pair()
    started.steer(reasoning="A greeting is asked for.", answer="Hello from the fake K2 upstream!")
    run = claude(started, tmp_path, "Say hello")
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, "Hello from the fake K2 upstream!", "")
    sent = started.received()
    assert sent and all(r["body"]["model"] == MODEL for r in sent)


def test_claude_code_runs_the_tool_the_model_calls_and_sends_its_result_back(pair, tmp_path):
    started = pair()
    marker = f"tool-ran-{secrets.token_hex(4)}"
    call = (f'<tool_call>{{"name": "Bash", "arguments": {{"command": "echo {marker}", "description": "Print"}}}}'
            '</tool_call>')
    started.steer(script=[{"answer": "I will run it.\n" + call}, {"answer": "The command printed the marker."}])
    run = claude(started, tmp_path, "Run the marker command", "--allowedTools", "Bash")
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, "The command printed the marker.", "")
    result = started.received()[-1]["body"]["messages"][-1]
    assert result["role"] == "user" and result["content"].startswith('<tool_result name="Bash"')
    assert marker in result["content"] and f"echo {marker}" not in result["content"], "the output, not the command"


def test_claude_code_reads_a_pdf_through_the_proxy_and_the_model_reads_its_text(pair, tmp_path):
    """Claude Code's Read tool returns a PDF as a document block in its tool result: its text reaches the model."""
    import pdfs
    started = pair()
    work = tmp_path / "claude-work"
    work.mkdir(exist_ok=True)
    (work / "report.pdf").write_bytes(pdfs.pdf(["Quarterly report", "Revenue rose by 12 percent."]))
    call = f'<tool_call>{{"name": "Read", "arguments": {{"file_path": "{work / "report.pdf"}"}}}}</tool_call>'
    started.steer(script=[{"answer": "I will read it.\n" + call}, {"answer": "Revenue rose by 12 percent."}])
    run = claude(started, tmp_path, "What does report.pdf say about revenue?", "--allowedTools", "Read")
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, "Revenue rose by 12 percent.", "")
    result = started.received()[-1]["body"]["messages"][-1]["content"]
    assert "(PDF, 2 pages)" in result and "--- page 2 ---\nRevenue rose by 12 percent." in result


CODEX_CONFIG = """model = "{model}"
model_provider = "k2proxy"
check_for_update_on_startup = false
{top}
[analytics]
enabled = false

[features]
plugins = false

[model_providers.k2proxy]
name = "k2proxy"
base_url = "{url}/v1"
wire_api = "responses"
env_key = "K2PROXY_API_KEY"
request_max_retries = 0
stream_max_retries = 0
"""


def codex(started, tmp_path, prompt, top="", provider=""):
    """`codex exec` with a fresh CODEX_HOME whose config.toml has the proxy as its provider (`top` and `provider`:
    more lines of config, at the top and in the provider's table)."""
    home, codex_home, work = tmp_path / "codex-home", tmp_path / "codex", tmp_path / "codex-work"
    for folder in (home, codex_home, work):
        folder.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(CODEX_CONFIG.format(model=MODEL, url=started.url, top=top) + provider)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(codex_home), "K2PROXY_API_KEY": E2E_KEY}
    return subprocess.run([cli("codex"), "exec", "--skip-git-repo-check", "--ephemeral", prompt], env=env, cwd=work,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def test_codex_answers_through_the_proxy(pair, tmp_path):
    started = pair()
    started.steer(reasoning="A greeting is asked for.", answer="Hello from the fake K2 upstream!")
    run = codex(started, tmp_path, "Say hello")
    assert (run.returncode, run.stdout.strip()) == (0, "Hello from the fake K2 upstream!"), run.stderr
    assert "ERROR" not in run.stderr and "A greeting is asked for." in run.stderr, "the reasoning summary is shown"
    assert [r["path"] for r in started.received()] == ["/api/guest/chat/completions"]


def test_codex_runs_the_shell_command_the_model_calls_and_sends_its_output_back(pair, tmp_path):
    started = pair()
    marker = f"tool-ran-{secrets.token_hex(4)}"
    call = f'<tool_call>{{"name": "exec_command", "arguments": {{"cmd": "echo {marker}"}}}}</tool_call>'
    started.steer(script=[{"answer": call}, {"answer": "The command printed the marker."}])
    run = codex(started, tmp_path, "Run the marker command")
    assert (run.returncode, run.stdout.strip()) == (0, "The command printed the marker."), run.stderr
    result = started.received()[-1]["body"]["messages"][-1]
    assert result["role"] == "user" and result["content"].startswith('<tool_result name="exec_command"')
    assert f"Output:\n{marker}" in result["content"], "the command's output, as Codex reports it"


def test_codex_compacts_a_long_session_through_the_proxy(pair, tmp_path):
    """Codex compacts a session whose tokens pass its limit (a custom provider's compaction is a Responses request
    of its own), then goes on from the summary."""
    started = pair()
    marker = f"tool-ran-{secrets.token_hex(4)}"
    call = f'<tool_call>{{"name": "exec_command", "arguments": {{"cmd": "echo {marker}"}}}}</tool_call>'
    many = {"prompt_tokens": 9000, "completion_tokens": 100, "total_tokens": 9100}  # past the limit below
    summary = f"The user asked for the marker command; echo printed {marker}."
    started.steer(script=[{"answer": call, "usage": many}, {"answer": summary}, {"answer": "Done: the marker."}])
    run = codex(started, tmp_path, "Run the marker command", top="model_auto_compact_token_limit = 5000\n")
    assert (run.returncode, run.stdout.strip()) == (0, "Done: the marker."), run.stderr
    compaction, after = [r["body"]["messages"] for r in started.received()[1:]]
    assert "COMPACTION" in compaction[-1]["content"] and marker in json.dumps(compaction)
    assert summary in json.dumps(after) and "context compacted" in run.stderr


def test_codex_works_over_the_websocket_mode_and_runs_a_tool(pair, tmp_path):
    started = pair()
    marker = f"tool-ran-{secrets.token_hex(4)}"
    call = f'<tool_call>{{"name": "exec_command", "arguments": {{"cmd": "echo {marker}"}}}}</tool_call>'
    started.steer(script=[{"answer": call}, {"answer": "The command printed the marker."}])
    run = codex(started, tmp_path, "Run the marker command", provider="supports_websockets = true\n")
    assert (run.returncode, run.stdout.strip()) == (0, "The command printed the marker."), run.stderr
    assert f"Output:\n{marker}" in started.received()[-1]["body"]["messages"][-1]["content"]
    status, log = http_json("GET", started.url + "/admin/requests")
    routes = [entry["route"] for entry in log["requests"]]
    assert status == 200 and routes.count("/v1/responses (WebSocket)") >= 2 and "/v1/responses" not in routes, \
        "every turn went over the WebSocket, none fell back to HTTP"


def test_claude_code_runs_a_native_tool_call_over_the_api_and_replays_its_reasoning(api_pair, tmp_path):
    started = api_pair()
    marker = f"tool-ran-{secrets.token_hex(4)}"
    thought = f"The user wants the marker command run; the Bash tool runs it. Marker {marker}."
    call = {"name": "Bash", "arguments": {"command": f"echo {marker}", "description": "Print the marker"}}
    started.steer(script=[{"reasoning": thought, "answer": "I will run it.", "tool_calls": [call]},
                          {"reasoning": "The output shows the marker.", "answer": "The command printed the marker."}])
    run = claude(started, tmp_path, "Run the marker command", "--allowedTools", "Bash")
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, "The command printed the marker.", "")
    assert_tool_loop_over_the_api(started, call, thought, marker)


def test_codex_runs_a_native_tool_call_over_the_api_and_replays_its_reasoning(api_pair, tmp_path):
    started = api_pair()
    marker = f"tool-ran-{secrets.token_hex(4)}"
    thought = f"The user wants the marker command run; exec_command runs it. Marker {marker}."
    call = {"name": "exec_command", "arguments": {"cmd": f"echo {marker}"}}
    started.steer(script=[{"reasoning": thought, "answer": "", "tool_calls": [call]},
                          {"reasoning": "The output shows the marker.", "answer": "The command printed the marker."}])
    run = codex(started, tmp_path, "Run the marker command")
    assert (run.returncode, run.stdout.strip()) == (0, "The command printed the marker."), run.stderr
    assert_tool_loop_over_the_api(started, call, thought, marker)


def test_a_missing_program_is_skipped_naming_its_install_command_unless_ci_requires_it(monkeypatch):
    name = f"k2proxy-no-such-program-{secrets.token_hex(4)}"
    expected = f"needs the program {name}, which is not installed: apt-get install -y {name}"
    monkeypatch.delenv(REQUIRE_PROGRAMS, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        need_program(name, f"apt-get install -y {name}", ROOT / ".clis" / name)
    monkeypatch.setenv(REQUIRE_PROGRAMS, "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        need_program(name, f"apt-get install -y {name}", ROOT / ".clis" / name)
    assert (skipped.value.msg, failed.value.msg, failed.value.pytrace) == (expected, expected, False)
