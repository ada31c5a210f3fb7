"""Docker without a Docker engine: what the Dockerfile, .dockerignore and compose file promise, checked in the files
and tried here as processes (no image is built)."""

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import urllib.parse
import urllib.request

from conftest import ROOT, free_port, need_program

import k2proxy

DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = (ROOT / "docker-compose.yml").read_text()
REPLICAS_COMPOSE = (ROOT / "docker-compose.replicas.yml").read_text()
NGINX_CONF = (ROOT / "deploy" / "nginx.conf").read_text()
MODEL = "IFM/K2-Horizon-375B-A23B"


# ─── Reading the Dockerfile ──────────────────────────────────────────────────


def instructions():
    """The final stage as (INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    pairs = [(name.upper(), args.strip()) for name, _, args in
             (line.strip().partition(" ") for line in joined.splitlines() if line.strip())]
    last_from = max(i for i, (name, _) in enumerate(pairs) if name == "FROM")
    return pairs[last_from:]


def arguments(name):
    return [args for instruction, args in instructions() if instruction == name]


def image_env():
    """The environment the image sets with ENV."""
    env = {}
    for args in arguments("ENV"):
        env.update(word.split("=", 1) for word in shlex.split(args))
    return env


def healthcheck_command():
    """The exec-form command of HEALTHCHECK, as the engine would run it."""
    (args,) = arguments("HEALTHCHECK")
    return json.loads(args.split(" CMD ", 1)[1])


def test_dockerfile_builds_a_small_non_root_image():
    """The image: pinned small base, only the requirements installed, no build tools, non-root, port, health."""
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-(alpine\d+\.\d+|slim-\w+)(@sha256:[0-9a-f]{64})?",
                        arguments("FROM")[0]), "the base is pinned to a Python patch release and a distribution release"
    assert arguments("WORKDIR") == ["/app"]
    names = [name for name, _ in instructions()]
    assert arguments("USER") == ["k2proxy"] and names.index("USER") < names.index("CMD"), "runs as k2proxy, not root"
    assert re.search(r"adduser [^&]*-u 10001 [^&]*k2proxy", DOCKERFILE)
    assert re.search(r"chown k2proxy:k2proxy /data\b", DOCKERFILE), "the token volume belongs to the user"
    assert arguments("EXPOSE") == ["8001"]
    assert json.loads(arguments("CMD")[-1]) == ["python", "k2proxy.py"], "exec form, so SIGTERM reaches Python"

    env = image_env()
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["USER_TOKENS_FILE"] == "/data/tokens.txt" and env["GUEST_TOKENS_FILE"] == "/data/tokens_guest.txt"
    assert env["ACCOUNTS_FILE"] == "/data/accounts.txt" and env["API_KEYS_FILE"] == "/data/api_keys.txt"

    copied = [word for args in arguments("COPY") for word in args.split()[:-1]]
    assert sorted(copied) == ["admin.html", "k2proxy.py", "requirements-pdf.txt", "requirements-redis.txt",
                              "requirements.txt"], \
        "only the code and requirements"
    final_stage = " ".join(args for _, args in instructions())
    assert not re.search(r"\b(curl|wget|gcc|musl-dev|build-base|build-essential|apk add|apt-get)\b", final_stage)

    command = healthcheck_command()
    assert command[:2] == ["python", "-c"] and "/health" in command[2], "standard library only, no curl"


def pip_installs(tmp_path, **build_args):
    """What pip is asked to install when the RUN instructions run as written, in sh, with the ARGs the builder would
    set: every command they call is a stub (a command with no stub is not found, and fails the test)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    asked = tmp_path / "pip-asked"
    asked.write_text("")
    for name in ("pip", "addgroup", "adduser", "mkdir", "chown"):
        (stubs / name).write_text(f'#!/bin/sh\n[ "$0" = "{stubs}/pip" ] && echo "$*" >> {asked}\nexit 0\n')
        (stubs / name).chmod(0o755)
    args = {name: value for name, _, value in (arg.partition("=") for arg in arguments("ARG"))}
    result = subprocess.run(["/bin/sh", "-ec", "\n".join(arguments("RUN"))], capture_output=True, text=True,
                            timeout=10, env={"PATH": str(stubs), **args, **build_args})
    assert result.returncode == 0, result.stderr
    return asked.read_text().splitlines()


def test_the_image_has_the_redis_package_only_when_built_with_redis(tmp_path):
    """`docker build .` installs aiohttp and pypdf (PDFs in messages); --build-arg WITH_REDIS=1 adds redis
    (REDIS_URL)."""
    assert arguments("ARG") == ["WITH_REDIS="], "WITH_REDIS is empty unless the build says otherwise"
    names = [name for name, _ in instructions()]
    assert names.index("ARG") < names.index("RUN"), "the ARG comes before the RUN that reads it"
    plain = "install --no-cache-dir -r requirements.txt -r requirements-pdf.txt"
    assert pip_installs(tmp_path) == [plain]
    assert pip_installs(tmp_path, WITH_REDIS="1") == [plain, "install --no-cache-dir -r requirements-redis.txt"]
    assert re.search(r"^pypdf==\d+\.\d+\.\d+$", (ROOT / "requirements-pdf.txt").read_text(), re.M), "pinned"
    assert re.search(r"^redis==\d+\.\d+\.\d+$", (ROOT / "requirements-redis.txt").read_text(), re.M), "pinned"
    assert "redis" not in (ROOT / "requirements.txt").read_text()


# ─── The health check, run as written ────────────────────────────────────────


def run_healthcheck(port, **env):
    """Exit status of the HEALTHCHECK command as written; only `python` becomes this test's interpreter."""
    command = healthcheck_command()
    return subprocess.run([sys.executable, *command[1:]], env={**os.environ, "PORT": str(port), **env},
                          capture_output=True, timeout=30).returncode


def test_healthcheck_passes_against_a_running_proxy_and_fails_against_a_stopped_one(spawn, tmp_path):
    """The engine restarts what this command calls unhealthy, so it must tell up from down."""
    # The command takes its port from PORT, as the proxy does, so the proxy runs on a free port and the
    # command text is not rewritten at all: it gets the same PORT the proxy got.
    assert "PORT" in healthcheck_command()[2], "the health check must follow the PORT setting"
    port = free_port()
    proxy = spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path,
                  env={"PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": "sk-docker"})
    assert run_healthcheck(port) == 0
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    assert run_healthcheck(port, http_proxy=dead_proxy, HTTP_PROXY=dead_proxy) == 0, \
        "a proxy configured for the container (e.g. by ~/.docker/config.json) must not break the health check"
    proxy.terminate()
    proxy.wait(10)
    assert run_healthcheck(port) != 0


# ─── .dockerignore ───────────────────────────────────────────────────────────


def _matches(pattern, parts):
    """Docker's rule: a pattern matches a path or one of its parents; `*` stays within one path segment."""
    if not pattern:
        return True
    if pattern[0] == "**":
        return any(_matches(pattern[1:], parts[n:]) for n in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(pattern[1:], parts[1:])


def docker_ignored(path):
    """Whether Docker leaves `path` out of the build context: the last matching rule wins."""
    ignored = False
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if rule and not rule.startswith("#"):
            negated, pattern = rule.startswith("!"), rule.lstrip("!").strip("/")
            if _matches(pattern.split("/"), path.split("/")):
                ignored = not negated
    return ignored


def test_dockerignore_keeps_secrets_and_junk_out():
    """Secrets never reach the build context, so they cannot end up in an image layer."""
    for path in (".env", ".env.local", "tokens.txt", "tokens_guest.txt", "accounts.txt", "data/tokens.txt",
                 ".git/config", "tests/test_api.py", "__pycache__/x.pyc", ".pytest_cache/v/cache/nodeids",
                 ".hypothesis/examples/x", "test-artifacts/admin-desktop.png", ".ci/run", "docs/admin.png"):
        assert docker_ignored(path), f"{path} reaches the build context"
    copied = [word for args in arguments("COPY") for word in args.split()[:-1]]
    for path in ("k2proxy.py", "admin.html", "requirements.txt", *copied):
        assert not docker_ignored(path), f"{path} is needed by the image but left out"


def test_the_example_env_leaves_the_image_file_paths_alone():
    """`docker run --env-file .env` lets .env override ENV: the example must not move the token files off /data."""
    example = k2proxy.parse_dotenv((ROOT / ".env.example").read_text())
    assert not {"USER_TOKENS_FILE", "GUEST_TOKENS_FILE", "ACCOUNTS_FILE", "API_KEYS_FILE"} & set(example), example


# ─── docker-compose.yml ──────────────────────────────────────────────────────


def compose_value(key):
    """The value of `key:` in the compose file (the first such line), as written."""
    match = re.search(rf"^\s*{re.escape(key)}:[ \t]*(.*?)\s*(#.*)?$", COMPOSE, re.M)
    return match and match.group(1)


def test_compose_file():
    """Compose runs the image with the port, .env, the token volume, a restart policy and the health check."""
    lines = [line.split("#")[0].strip() for line in COMPOSE.splitlines()]
    assert compose_value("build") == "."
    assert compose_value("image") == "k2proxy"
    assert '- "8001:8001"' in lines
    assert compose_value("env_file") == ".env"
    assert "- ./data:/data" in lines
    assert compose_value("restart") == "unless-stopped"
    assert compose_value("stop_grace_period") == "10s"
    assert json.loads(compose_value("test")) == ["CMD", *healthcheck_command()], "the Dockerfile's health check"
    assert (compose_value("interval"), compose_value("timeout"), compose_value("retries")) == ("30s", "5s", "3")
    # environment: beats env_file, so a .env written for running without Docker cannot move the
    # listener off the mapped port or the token files off the volume.
    for key, value in {"HOST": "0.0.0.0", "PORT": '"8001"', **{key: image_env()[key] for key in (
            "USER_TOKENS_FILE", "GUEST_TOKENS_FILE", "ACCOUNTS_FILE", "API_KEYS_FILE")}}.items():
        assert compose_value(key) == value, key


# ─── docker-compose.replicas.yml and deploy/nginx.conf ───────────────────────


def yaml_blocks(text, indent=0):
    """A YAML mapping written a key a line, as the compose files are: each key at `indent` → (what follows its colon,
    the lines under it, as written), comments dropped. Enough for these files, read without a YAML library."""
    blocks, name = {}, None
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if not line.strip():
            continue
        if len(line) - len(line.lstrip()) == indent:
            name, _, rest = line.strip().partition(":")
            blocks[name] = (rest.strip(), [])
        elif name is not None:
            blocks[name][1].append(line)
    return {name: (value, lines) for name, (value, lines) in blocks.items()}


def value_in(lines, key):
    """The value of `key:` among a block's lines (the first such line), as written; None when it has none."""
    return next((line.partition(":")[2].strip() for line in map(str.strip, lines) if line.startswith(key + ":")), None)


def items_in(lines):
    """The list items among a block's lines, as written."""
    return [line.strip() for line in lines if line.strip().startswith("- ")]


def replicas_compose():
    """The compose file's services, and the block the replicas are made of (an anchor each replica aliases)."""
    top = yaml_blocks(REPLICAS_COMPOSE)
    services = yaml_blocks("\n".join(top["services"][1]), 2)
    anchors = {value[1:]: lines for value, lines in top.values() if value.startswith("&")}
    replicas = {name: anchors[value[1:]] for name, (value, _) in services.items() if value[1:] in anchors}
    return {name: lines for name, (_, lines) in services.items()}, replicas


def test_replicas_compose_runs_two_replicas_with_redis_behind_nginx():
    """Two replicas built with the redis package, pointed at the redis service, on one data volume, behind nginx; Redis
    has a password and an append-only file, and is published nowhere."""
    services, replicas = replicas_compose()
    assert sorted(replicas) == ["k2proxy-1", "k2proxy-2"] and sorted(services) == [
        "k2proxy-1", "k2proxy-2", "nginx", "redis"]
    assert value_in(REPLICAS_COMPOSE.splitlines(), "name") == "k2proxy-replicas", \
        "a project of its own, apart from docker-compose.yml's (whose container would otherwise be an orphan)"
    (replica,) = {tuple(lines) for lines in replicas.values()}
    assert value_in(replica, "context") == "." and value_in(replica, "WITH_REDIS") == '"1"', "built with redis"
    assert value_in(replica, "env_file") == ".env" and "- ./data:/data" in items_in(replica)
    assert value_in(replica, "restart") == "unless-stopped" and value_in(replica, "stop_grace_period") == "10s"
    for key, value in {"HOST": "0.0.0.0", "PORT": '"8001"', **{key: image_env()[key] for key in (
            "USER_TOKENS_FILE", "GUEST_TOKENS_FILE", "ACCOUNTS_FILE", "API_KEYS_FILE", "IFM_KEYS_FILE")}}.items():
        assert value_in(replica, key) == value, key
    assert re.fullmatch(r"\$\{VALID_API_KEY:\?[^}]+\}", value_in(replica, "VALID_API_KEY")), \
        "one key for every replica: compose refuses to start without it, rather than each replica generating its own"

    password = re.fullmatch(r"redis://:(\$\{REDIS_PASSWORD:\?[^}]+\})@.*", value_in(replica, "REDIS_URL"))
    assert password, "the password comes from .env, and is never written here"
    url = urllib.parse.urlsplit(value_in(replica, "REDIS_URL").replace(password[1], "pw"))  # as compose fills it in
    assert (url.scheme, url.hostname, url.port, url.path) == ("redis", "redis", 6379, "/0"), "the redis service"
    redis = services["redis"]
    assert value_in(redis, "image") == "redis:7-alpine"
    command = json.loads(value_in(redis, "command"))
    assert command[0] == "redis-server"
    assert command[command.index("--requirepass") + 1] == password[1], "the password the replicas send"
    assert command[command.index("--appendonly") + 1] == "yes", "stored responses survive a restart of Redis"
    assert "- redis-data:/data" in items_in(redis) and value_in(redis, "test") and value_in(redis, "REDISCLI_AUTH")
    assert value_in(replica, "condition") == "service_healthy"

    nginx = services["nginx"]
    assert value_in(nginx, "image") == "nginx:alpine"
    assert "- ./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in items_in(nginx)
    assert {"- k2proxy-1", "- k2proxy-2"} <= set(items_in(nginx))
    published = [item for lines in (redis, replica, nginx) for item in items_in(lines)
                 if re.fullmatch(r'- "?\d+:\d+"?', item)]
    assert published == ['- "8001:8001"'] and value_in(nginx, "ports") == "", "nginx alone is published; Redis never is"
    assert value_in(redis, "ports") is None and value_in(replica, "ports") is None


def nginx_directives(text):
    """(name, arguments) of each directive of an nginx config, in order, comments dropped and blocks flattened."""
    text = re.sub(r"#.*", "", text)
    return [(match[1], match[2].split()) for match in re.finditer(r"([a-z_]+)\s*([^;{}]*)[;{]", text)]


def directive(name):
    (args,) = [args for found, args in nginx_directives(NGINX_CONF) if found == name]
    return args


def test_nginx_passes_streams_on_round_robin_over_the_replicas():
    """nginx sends requests to each replica in turn, streams each piece as it comes, passes bodies on as they arrive
    (k2proxy's own body limits apply) and waits as long as a completion may take."""
    _, replicas = replicas_compose()
    names = [name for name, _ in nginx_directives(NGINX_CONF)]
    (upstream,) = directive("upstream")
    assert directive("proxy_pass") == [f"http://{upstream}"]
    servers = [args for name, args in nginx_directives(NGINX_CONF) if name == "server" and args]
    assert [args[0] for args in servers] == [f"{name}:8001" for name in sorted(replicas)]
    assert not {"ip_hash", "hash", "least_conn", "random", "sticky"} & set(names), "round robin, nginx's default"
    if any("resolve" in args for args in servers):
        assert directive("resolver")[0] == "127.0.0.11" and "zone" in names, "Docker's DNS, and the zone resolve needs"
    assert directive("listen") == ["8001"], "the port compose publishes"
    assert directive("proxy_buffering") == ["off"], "streams reach the client piece by piece"
    assert directive("proxy_request_buffering") == ["off"], "bodies reach k2proxy as they arrive"
    assert directive("proxy_http_version") == ["1.1"] and ["Connection", '""'] in [
        args for name, args in nginx_directives(NGINX_CONF) if name == "proxy_set_header"]
    settings = k2proxy.load_settings({"VALID_API_KEY": "sk-x"})
    (read_timeout,) = directive("proxy_read_timeout")
    assert int(read_timeout.removesuffix("s")) >= settings.completion_timeout, "a long non-streamed answer is not cut"
    (body_size,) = directive("client_max_body_size")
    assert int(body_size.removesuffix("m")) > settings.max_request_mb, "k2proxy, not nginx, refuses a large body"


def test_nginx_accepts_the_config(tmp_path):
    """nginx -t with the config where the image puts it (inside http), the replicas' names made local; an nginx older
    than 1.27.3 (Debian 12 has 1.22) knows no `resolve`, so that word is left out there."""
    program = need_program("nginx", "apt-get install nginx-light (Debian's package)", "/usr/sbin/nginx")
    version = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)",
                        subprocess.run([program, "-v"], capture_output=True, text=True, timeout=10).stderr)
    config = NGINX_CONF
    for name in replicas_compose()[1]:
        config = config.replace(f"{name}:8001", "127.0.0.1:8001")
    if tuple(map(int, version.groups())) < (1, 27, 3):
        config = re.sub(r"(server \S+) resolve;", r"\1;", config)
    (tmp_path / "default.conf").write_text(config)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; events {{}}\n"
        f"http {{ client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy; "
        f"include {tmp_path}/default.conf; }}\n")
    result = subprocess.run([program, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_the_example_env_names_what_the_replicas_need():
    """.env.example shows REDIS_URL and WORKERS (commented out, so nothing changes) and every variable the replicas'
    compose file takes from .env; uncommented, its lines are settings that load."""
    example = (ROOT / ".env.example").read_text()
    for name in set(re.findall(r"\$\{([A-Z_]+)", REPLICAS_COMPOSE)):
        assert re.search(rf"^(# )?{name}=", example, re.M), f"{name} is not in .env.example"
    assert not {"REDIS_URL", "WORKERS"} & set(k2proxy.parse_dotenv(example)), "commented out: one process, as ever"
    lines = re.findall(r"^# ((?:REDIS_URL|WORKERS)=.*)$", example, re.M)
    assert len(lines) == 2
    settings = k2proxy.load_settings({"VALID_API_KEY": "sk-x"}, "\n".join(lines))
    assert settings.redis_url.startswith("redis://") and settings.workers > 1


# ─── The image's process: read-only code, SIGTERM with a stream in flight ───


def post(url, body, headers=None):
    return urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                  headers={"Content-Type": "application/json", **(headers or {})})


def test_sigterm_ends_streams_and_exits_cleanly(spawn, tmp_path):
    """`docker stop` sends SIGTERM, then SIGKILL 10 s later: streams in flight get their end, the exit code is 0."""
    source, work, data = tmp_path / "app", tmp_path / "work", tmp_path / "data"
    for folder in (source, work, data):
        folder.mkdir()
    for name in ("k2proxy.py", "admin.html"):
        shutil.copy(ROOT / name, source / name)
        os.chmod(source / name, 0o444)
    os.chmod(source, 0o555)   # not enforced for root: the listings are compared at the end instead
    upstream_port, port = free_port(), free_port()
    spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(upstream_port)], upstream_port)
    urllib.request.urlopen(post(f"http://127.0.0.1:{upstream_port}/_fake/reply",
                                {"reasoning": "x" * 2000, "answer": "done", "piece": 5, "delay": 0.05}), timeout=5)
    env = {key: value.replace("/data/", f"{data}/", 1) for key, value in image_env().items()}
    proxy = spawn([str(source / "k2proxy.py")], port, cwd=work, env={
        **env, "PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": "sk-docker",
        "K2THINK_BASE_URL": f"http://127.0.0.1:{upstream_port}"})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        assert json.load(response)["status"] == "ok"

    lines, failures, first_data = [], [], threading.Event()

    def read_stream():
        request = post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": "Bearer sk-docker"},
                       body={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                for raw in response:
                    lines.append(raw.decode().strip())
                    if lines[-1].startswith("data: "):
                        first_data.set()
        except Exception as exc:
            failures.append(exc)
        finally:
            first_data.set()

    reader = threading.Thread(target=read_stream, daemon=True)
    reader.start()
    assert first_data.wait(15) and not failures, failures
    proxy.send_signal(signal.SIGTERM)
    try:
        code = proxy.wait(10)
    except subprocess.TimeoutExpired:
        raise AssertionError("the proxy was still running 10 s after SIGTERM") from None
    reader.join(10)
    assert not reader.is_alive(), "the client's stream never ended"
    assert code == 0, proxy.stderr.read()[-2000:]

    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert not failures, failures
    assert len(events) >= 2 and events[-1] == "[DONE]", f"the stream ended without [DONE]: {lines[-5:]}"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down", "a 20 s answer is cut, and says why"

    assert sorted(p.name for p in source.iterdir()) == ["admin.html", "k2proxy.py"], "wrote into its code dir"
    assert not any(work.iterdir()), "wrote into its working directory"
