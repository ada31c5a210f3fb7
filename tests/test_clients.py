"""The real client programs, from npm, run through the proxy as a user runs them: Claude Code on /v1/messages,
Codex CLI on /v1/responses.

They are looked for in .clis/ (where `.ci/run` installs them) and then on the PATH."""

import os
import secrets
import shutil
import subprocess

import pytest
from conftest import E2E_KEY, MODEL, ROOT

CLIS = ROOT / ".clis" / "node_modules" / ".bin"
INSTALL = "npm install --prefix .clis @anthropic-ai/claude-code@2.1.197 @openai/codex@0.169.0"
QUIET = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
         "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_MAX_RETRIES": "0"}


def cli(name):
    """The path of a client program, or a one-line failure naming the install command."""
    path = CLIS / name if (CLIS / name).exists() else shutil.which(name)
    if not path:
        pytest.fail(f"the client tests need the real {name} program, which is not installed: {INSTALL}",
                    pytrace=False)
    return str(path)


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


CODEX_CONFIG = """model = "{model}"
model_provider = "k2proxy"
check_for_update_on_startup = false

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


def codex(started, tmp_path, prompt):
    """`codex exec` with a fresh CODEX_HOME whose config.toml has the proxy as its provider."""
    home, codex_home, work = tmp_path / "codex-home", tmp_path / "codex", tmp_path / "codex-work"
    for folder in (home, codex_home, work):
        folder.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(CODEX_CONFIG.format(model=MODEL, url=started.url))
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
