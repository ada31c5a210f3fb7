"""The real client programs, from npm, run through the proxy as a user runs them: Claude Code on /v1/messages.

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
    call = f'<tool_call>{{"name": "Bash", "arguments": {{"command": "echo {marker}", "description": "Print"}}}}</tool_call>'
    started.steer(script=[{"answer": "I will run it.\n" + call}, {"answer": "The command printed the marker."}])
    run = claude(started, tmp_path, "Run the marker command", "--allowedTools", "Bash")
    assert (run.returncode, run.stdout.strip(), run.stderr) == (0, "The command printed the marker.", "")
    result = started.received()[-1]["body"]["messages"][-1]
    assert result["role"] == "user" and result["content"].startswith('<tool_result name="Bash"')
    assert marker in result["content"] and f"echo {marker}" not in result["content"], "the output, not the command"
