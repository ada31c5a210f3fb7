"""Settings: .env parsing, precedence, bad values, the generated key (kept for the next start, or good for one
run), --help and the README table; the lines a process logs as it starts and stops."""

import json
import re
import signal
import socket
import stat
import subprocess
import sys

import pytest
from conftest import API_KEY, ROOT, free_port

import k2proxy


def test_dotenv_syntax():
    text = """
# a comment
export HOST=127.0.0.1
PORT = 9000   # inline comment
VALID_API_KEY="sk-a,sk-b # not a comment"
ADMIN_KEY='single quoted # kept'
MODELS=a#b
LOG_LEVEL=
"""
    assert k2proxy.parse_dotenv(text) == {"HOST": "127.0.0.1", "PORT": "9000",
                                          "VALID_API_KEY": "sk-a,sk-b # not a comment",
                                          "ADMIN_KEY": "single quoted # kept", "MODELS": "a#b", "LOG_LEVEL": ""}


@pytest.mark.parametrize("line", ["JUST_A_WORD", "1BAD=x", 'Q="unterminated'])
def test_dotenv_bad_line_names_the_line(line):
    with pytest.raises(k2proxy.SettingsError, match="line 2"):
        k2proxy.parse_dotenv("A=1\n" + line)


def test_environment_wins_over_dotenv_over_defaults():
    settings = k2proxy.load_settings({"PORT": "9001"}, "PORT=9000\nPROXY_MODE=user\n")
    assert settings.port == 9001 and settings.proxy_mode == "user" and settings.host == "0.0.0.0"


def test_defaults():
    settings = k2proxy.load_settings({})
    assert settings.port == 8001 and settings.proxy_mode == "guest"
    assert settings.guest_api_url == "https://chat.ifm.ai/api/guest/chat/completions"
    assert settings.user_api_url == "https://chat.ifm.ai/api/chat/completions"
    assert settings.models == ["IFM/K2-Horizon-375B-A23B"] and settings.reasoning_effort == "high"
    assert settings.valid_api_key[0].startswith("sk-") and settings.api_key_generated
    assert settings.admin_key == settings.valid_api_key[0]


def test_urls_hang_off_the_base_unless_overridden():
    settings = k2proxy.load_settings({"K2THINK_BASE_URL": "http://127.0.0.1:9/", "USER_API_URL": "http://x:1/chat"})
    assert settings.guest_api_url == "http://127.0.0.1:9/api/guest/chat/completions"
    assert settings.user_api_url == "http://x:1/chat"


@pytest.mark.parametrize("name,value", [("PORT", "abc"), ("PORT", "70000"), ("PROXY_MODE", "admin"),
                                        ("THINKING_FORMAT", "xml"), ("TOOL_SUPPORT", "maybe"),
                                        ("MAX_REQUEST_MB", "-1"), ("REQUEST_TIMEOUT", "soon"),
                                        ("K2THINK_BASE_URL", "ftp://x"), ("MODELS", " , "),
                                        ("ADMIN_PAGE_PATH", "admin"), ("LOG_LEVEL", "LOUD"),
                                        ("VALID_API_KEY", "sk-mine,sk-change-me"), ("ADMIN_KEY", "sk-change-me"),
                                        ("ADMIN_PAGE_PATH", "/admin/tokens/update"), ("ADMIN_PAGE_PATH", "/health"),
                                        ("ADMIN_PAGE_PATH", "/v1/panel")])
def test_bad_value_stops_start_up_with_one_line_naming_it(name, value):
    result = subprocess.run([sys.executable, str(ROOT / "k2proxy.py")], env={name: value, "PATH": ""},
                            capture_output=True, text=True, timeout=20, cwd=ROOT / "tests")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and name in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "192.0.2.99"], ids=["port-taken", "foreign-address"])
def test_an_address_it_cannot_listen_on_stops_start_up_with_one_line(host):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run([sys.executable, str(ROOT / "k2proxy.py")], capture_output=True, text=True, timeout=30,
                                env={"HOST": host, "PORT": str(taken.getsockname()[1]), "VALID_API_KEY": "sk-x",
                                     "LOG_LEVEL": "ERROR", "PATH": ""}, cwd=ROOT / "tests")
    assert result.returncode == 1
    assert result.stderr.startswith(f"k2proxy: cannot listen on {host}:"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_secret_values_are_not_echoed_in_errors():
    with pytest.raises(k2proxy.SettingsError) as error:
        k2proxy.load_settings({"VALID_API_KEY": "sk-x", "ADMIN_KEY": "secret", "PORT": "secret-port"})
    assert "secret-port" in str(error.value)
    assert "sk-x" not in str(error.value)


def test_help_lists_every_setting_with_its_default():
    result = subprocess.run([sys.executable, str(ROOT / "k2proxy.py"), "--help"], capture_output=True, text=True,
                            timeout=20)
    assert result.returncode == 0
    assert "(default: https://chat.ifm.ai)" in result.stdout and "(default: IFM/K2-Horizon-375B-A23B)" in result.stdout
    for setting in k2proxy.SETTINGS:
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(setting.name + " "))
        assert f"(default: {setting.default or 'empty'})" in line


def test_readme_table_matches_the_settings():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `?([^|`]*)`? \| (.*) \|$", readme, re.MULTILINE)
    assert rows == [(s.name, s.default, s.help) for s in k2proxy.SETTINGS]


def test_public_settings_hide_secrets():
    public = k2proxy.load_settings({"VALID_API_KEY": "sk-secret", "ADMIN_KEY": "adm-key-xyz"}).public()
    assert "VALID_API_KEY" not in public and "ADMIN_KEY" not in public
    assert "sk-secret" not in repr(public) and "adm-key-xyz" not in repr(public)


def test_a_missing_env_file_stops_start_up_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "k2proxy.py"), "--env-file", str(tmp_path / "missing.env")],
                            capture_output=True, text=True, timeout=20, env={"PATH": ""})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "missing.env: no such file" in result.stderr


def test_names_that_are_not_settings_are_warned_of_with_the_closest_one():
    settings = k2proxy.load_settings({"TOOL_SUPORT": "false", "HOSTNAME": "box", "PATH": "/bin", "LANG": "C"},
                                     "TOOL_SUPORT=false\nMY_OWN_THING=1\n")
    assert settings.tool_support is True, "a misspelt name sets nothing"
    env_warnings = [w for w in settings.warnings if w.startswith("the environment")]
    dotenv_warnings = [w for w in settings.warnings if w.startswith(".env")]
    assert len(env_warnings) == 1
    assert "TOOL_SUPORT" in env_warnings[0] and "did you mean TOOL_SUPPORT?" in env_warnings[0]
    assert len(dotenv_warnings) == 2 and "did you mean TOOL_SUPPORT?" in dotenv_warnings[0]
    assert "MY_OWN_THING" in dotenv_warnings[1] and "did you mean" not in dotenv_warnings[1]


def test_the_start_up_line_comes_once_listening_with_a_reachable_url(spawn, tmp_path):
    port = free_port()
    (tmp_path / ".env").write_text("TOOL_SUPORT=false\n")
    process = spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path, env={"PORT": str(port), "HOST": "0.0.0.0",
                                                                          "VALID_API_KEY": ""})
    process.terminate()
    log = process.communicate(timeout=10)[1]
    assert f"admin key of the admin page (http://127.0.0.1:{port}/admin)" in log
    assert f"listening on http://127.0.0.1:{port} (and on every address of this machine)" in log
    assert "did you mean TOOL_SUPPORT?" in log and "0.0.0.0" not in log


def test_help_names_every_client_api_and_upstream():
    result = subprocess.run([sys.executable, str(ROOT / "k2proxy.py"), "--help"], capture_output=True, text=True,
                            timeout=30)
    text = " ".join(result.stdout.split())
    assert "OpenAI chat completions, OpenAI Responses and Anthropic Messages" in text and "IFM's API" in text


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


def test_a_generated_key_file_that_cannot_be_written_gives_a_key_for_the_run(tmp_path, capsys):
    settings = k2proxy.load_settings({"GENERATED_KEY_FILE": str(tmp_path / "missing-dir" / "key.txt")},
                                     generate_key=k2proxy.kept_key)
    assert settings.valid_api_key[0].startswith("sk-") and "good for this run only" in capsys.readouterr().err
    assert json.dumps(settings.public()).count(settings.valid_api_key[0]) == 0


def test_shutdown_is_logged(spawn, tmp_path):
    port = free_port()
    process = spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path,
                    env={"PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": API_KEY})
    process.send_signal(signal.SIGTERM)
    process.wait(10)
    log = process.stderr.read()
    assert "k2proxy stopping" in log and "k2proxy stopped" in log


DEFAULT_IN_PROSE = [  # the ways the README and docs/ quote a setting's default in prose
    re.compile(r"`([A-Z][A-Z0-9_]+)` \(default `?(\d{1,3}(?:,\d{3})+|[^`),]+)`?[),]"),  # `MAX_PDF_PAGES` (default 100,
    re.compile(r"`([A-Z][A-Z0-9_]+)` setting \(`([^`]+)`"),               # the `REASONING_EFFORT` setting (`high`
    re.compile(r"default `([A-Z][A-Z0-9_]+)`, `([^`]+)`"),                # default `REASONING_EFFORT`, `high`
    re.compile(r"`([A-Z][A-Z0-9_]+)` 设置（默认 `([^`]+)`）"),              # the Chinese quick start's
]


def test_the_defaults_the_readme_and_docs_quote_in_prose_are_the_settings():
    defaults = {setting.name: setting.default for setting in k2proxy.SETTINGS}
    quoted = [(path.name, name, value) for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
              for pattern in DEFAULT_IN_PROSE for name, value in pattern.findall(path.read_text(encoding="utf-8"))
              if name in defaults]
    assert len(quoted) >= 5, quoted
    def plain(value):  # 400,000 is 400000
        return value.replace(",", "") if re.fullmatch(r"[\d,]+", value) else value.strip()
    assert [(where, name, value) for where, name, value in quoted if plain(value) != defaults[name]] == []
