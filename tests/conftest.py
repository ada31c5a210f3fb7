"""Shared fixtures and helpers: the fakes of each upstream kind, proxies pointed at them, and what more than one test
file uses."""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=300, derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])  # a fixed seed: the same examples each run
settings.register_profile("long", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))  # --hypothesis-profile=long overrides it

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import urllib.request  # noqa: E402

import anthropic  # noqa: E402
import openai  # noqa: E402
from fake_api import FakeIFM  # noqa: E402
from fake_site import FakeK2Think, make_jwt  # noqa: E402

import k2proxy  # noqa: E402

MODEL = "IFM/K2-Horizon-375B-A23B"
API_KEY = "sk-test-key"
ADMIN_KEY = "admin-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ALICE, BOB, CAROL = "sk-alice-0123456789", "sk-bob-0123456789", "sk-carol-0123456789"  # named keys of API_KEYS_FILE
CHAT, MESSAGES, COUNT, RESPONSES = "/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses"
DIALECTS = pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES], ids=["chat", "anthropic", "responses"])
EACH_DIALECT = pytest.mark.parametrize("kind", ["chat", "anthropic", "responses"])
WHOLE_OR_STREAMED = pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
NO_REASONING_SHOWN = {"chat": {}, "anthropic": {"thinking": None}, "responses": {"reasoning": None}}  # nor effort asked
POOL_TOKENS = [make_jwt(time.time() + 3600, f"acc-{n}") for n in range(3)]  # three accounts' tokens, good for an hour
TOOL_NAMES = frozenset({"get_weather", "search"})
DEEP = "[" * 3000 + "]" * 3000  # JSON nested deeper than any parser here takes
IMAGE = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJ"
         "RU5ErkJggg==")  # one pixel
TEXT_PARTS = {"chat": [{"type": "text", "text": "First line."}, {"type": "text", "text": "Second line."}],
              "anthropic": [{"type": "text", "text": "First line."}, {"type": "text", "text": "Second line."}],
              "responses": [{"type": "input_text", "text": "First line."},
                            {"type": "input_text", "text": "Second line."}]}
IMAGE_PARTS = {"chat": {"type": "image_url", "image_url": {"url": IMAGE}},
               "anthropic": {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                         "data": IMAGE.split(",", 1)[1]}},
               "responses": {"type": "input_image", "image_url": IMAGE}}


def pytest_addoption(parser):
    parser.addoption("--load", action="store_true", help="also run the load tests marked `load` (CI does)")
    parser.addoption("--soak", action="store_true", help="run the 60 s soak instead of the short one (implies --load)")


def pytest_collection_modifyitems(config, items):
    """Leaves the multi-second load tests out unless --load (or --soak) asks for them."""
    if config.getoption("--load") or config.getoption("--soak"):
        return
    left_out = [item for item in items if item.get_closest_marker("load")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("load")]


@pytest.fixture
async def fake(aiohttp_server):
    """The fake upstream, served over real HTTP on loopback."""
    upstream = FakeK2Think()
    server = await aiohttp_server(upstream.app)
    upstream.url = str(server.make_url("")).rstrip("/")
    return upstream


@pytest.fixture
def proxy_settings(fake, tmp_path):
    """Settings for a proxy in front of the fake; keyword arguments override environment names."""
    def build(**env):
        values = {"VALID_API_KEY": API_KEY, "ADMIN_KEY": ADMIN_KEY, "K2THINK_BASE_URL": fake.url,
                  "USER_TOKENS_FILE": str(tmp_path / "tokens.txt"),
                  "GUEST_TOKENS_FILE": str(tmp_path / "tokens_guest.txt"), "REQUEST_TIMEOUT": "5"}
        values.update({key: str(value) for key, value in env.items()})
        return k2proxy.load_settings(values)
    return build


@pytest.fixture
def make_proxy(aiohttp_client, proxy_settings):
    """Starts an in-process proxy in front of the fake and returns its client."""
    async def start(**env):
        return await aiohttp_client(k2proxy.make_app(proxy_settings(**env)))
    return start


@pytest.fixture
async def proxy(make_proxy):
    return await make_proxy()


@pytest.fixture
async def keyed(make_proxy, tmp_path):
    """A proxy whose named keys are alice (with the limits a test gives) and bob (none)."""
    async def start(alice_limits="", **env):
        (tmp_path / "api_keys.txt").write_text(f"alice:{ALICE} {alice_limits}\nbob:{BOB}\n")
        return await make_proxy(API_KEYS_FILE=tmp_path / "api_keys.txt", **env)
    return start


@pytest.fixture
def api_proxy(make_proxy, fake_api, tmp_path):
    """Starts a proxy whose upstream is the fake API (or the server at `base`), with the IFM key `key` (several:
    comma-separated) and a keys file of its own."""
    async def start(key="IFM-test-key-00000000aaa", base=None, **env):
        return await make_proxy(**{"UPSTREAM": "api", "IFM_BASE_URL": (base or fake_api.url) + "/v1",
                                   "IFM_API_KEY": key, "IFM_KEYS_FILE": tmp_path / "ifm_keys.txt", **env})
    return start


def state_of(proxy):
    return proxy.server.app[k2proxy.STATE]


def pool_of(proxy):
    return state_of(proxy).site.pool


def as_key(key):
    return {"Authorization": f"Bearer {key}"}


def chat(content="Hi", model=MODEL, **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def never_reading_client(port, key):
    """A client that asks the proxy at `port` for a streamed chat completion and never reads it (a small receive
    buffer, so the proxy's writes soon wait); its writer, to close at the end."""
    body = json.dumps(chat(stream=True)).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return writer


def asked(path, content="Hi", stream=False, **extra):
    """A minimal request of the dialect served at `path`."""
    if path == CHAT:
        return chat(content, stream=stream, **extra)
    if path in (MESSAGES, COUNT):
        body = {"model": MODEL, "max_tokens": 4096, "messages": [{"role": "user", "content": content}], **extra}
        return body if path == COUNT else {**body, "stream": stream}
    return {"model": MODEL, "input": content, "stream": stream, **extra}


async def post_chat(proxy, body):
    return await proxy.post(CHAT, json=body, headers=AUTH)


def effort_sent(fake, index=-1):
    return fake.received[index].body["extra_body"]["chat_template_kwargs"]["reasoning_effort"]


def expanding_body(size):
    """`size` bytes of JSON that a naive proxy would turn into millions of objects."""
    head, tail = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "x": [', b"{}]}"
    return head + b"{}," * ((size - len(head) - len(tail)) // 3) + tail


async def read_sse(response):
    """The JSON events and the raw comment lines of an SSE answer, in order."""
    import json
    events, comments = [], []
    for line in (await response.read()).decode().split("\n"):
        line = line.strip()
        if line.startswith(":"):
            comments.append(line)
        elif line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events, comments


async def read_named_sse(response):
    """The (event name, JSON data) pairs of an SSE answer whose events are named, as Anthropic and Responses send."""
    import json
    events, name, ended = [], None, False
    for line in (await response.read()).decode().split("\n"):
        if line.startswith("event: "):
            name = line[7:].strip()
        elif line == "data: [DONE]":  # a Responses stream's end: nothing may follow it
            ended = True
        elif line.startswith("data: "):
            assert not ended, f"an event after data: [DONE]: {line}"
            events.append((name, json.loads(line[6:])))
            name = None
    return events


def stream_text_of(path, raw):
    """The answer's text, as the client of that dialect reads it from a stream."""
    if path == CHAT:
        events = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    data = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
    if path == MESSAGES:
        return "".join(d["delta"].get("text", "") for d in data if d.get("type") == "content_block_delta")
    return "".join(d["delta"] for d in data if d.get("type") == "response.output_text.delta")


def stream_ended_well(path, raw):
    if path == CHAT:
        return raw.rstrip().endswith("data: [DONE]")
    return ("event: message_stop" if path == MESSAGES else "event: response.completed") in raw


def ends_with_error(path, raw):
    """The code (or type) of the error a stream of `path` ended with, once it is checked to end as its dialect's do."""
    if path == CHAT:
        events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return json.loads(events[-2])["error"]["code"]
    names = [line[7:].strip() for line in raw.split("\n") if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: {")]
    if path == MESSAGES:
        assert names[-1] == "error"
        return data[-1]["error"]["type"]
    assert names[-1] == "response.failed" and data[-1]["response"]["status"] == "failed"
    return data[-1]["response"]["error"]["code"]


def stream_text(events, field="content"):
    return "".join(e["choices"][0]["delta"].get(field) or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def scan_answer(names, text, step):
    """Feeds an answer to the tool-call scanner `step` characters at a time; returns what came out, in order."""
    scanner = k2proxy.ToolCallScanner(names)
    out = []
    for start in range(0, len(text), step):
        out += scanner.feed(text[start:start + step])
    return out + scanner.finish()


async def until(condition, seconds=5.0):
    """Waits for something a background task does (a sign-in, a file poll, a clean-up), failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"did not happen within {seconds} s"
        await asyncio.sleep(0.02)


REQUIRE_PROGRAMS = "K2PROXY_REQUIRE_PROGRAMS"


def need_program(name, install_hint, *places):
    """A program a test runs, from `places` or the PATH; missing: a skip naming its install, or in CI a failure."""
    for place in places:
        if os.access(place, os.X_OK):
            return str(place)
    if path := shutil.which(name):
        return path
    message = f"needs the program {name}, which is not installed: {install_hint}"
    if os.environ.get(REQUIRE_PROGRAMS) == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, process, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}: {process.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture
def spawn():
    """Starts processes (fake upstream, proxy) and stops them after the test."""
    processes = []

    def start(args, port, env=None, cwd=None, **popen):
        process = subprocess.Popen([sys.executable, *args], env={**os.environ, **(env or {})}, cwd=cwd,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
        processes.append(process)
        wait_for_port(port, process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


class Pair:
    """A fake upstream process and a proxy process in front of it, as a user runs them."""

    def __init__(self, spawn, cwd, env, site):
        self.upstream_port, self.port = free_port(), free_port()
        spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(self.upstream_port), "--site", site],
              self.upstream_port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = spawn([str(ROOT / "k2proxy.py")], self.port, cwd=cwd, env={
            "PORT": str(self.port), "HOST": "127.0.0.1", "VALID_API_KEY": E2E_KEY,
            "K2THINK_BASE_URL": f"http://127.0.0.1:{self.upstream_port}", **env})

    def _fake(self, path, body=None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.upstream_port}{path}",
                                         method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None)
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def steer(self, **reply):
        """Sets the fake's reply (with token=..., that token's reply; with script=[...], the next replies)."""
        self._fake("/_fake/reply", reply)

    def received(self):
        """What the fake's chat endpoints received: path, body and token of each request."""
        return self._fake("/_fake/received")


E2E_KEY = "sk-e2e"


@pytest.fixture
def pair(spawn, tmp_path):
    """Starts a fake upstream and a proxy as processes; keyword arguments are the proxy's settings."""
    def start(site="k2horizon", tokens=(), **env):
        if tokens:
            (tmp_path / "tokens.txt").write_text("\n".join(tokens) + "\n")
        return Pair(spawn, tmp_path, {key: str(value) for key, value in env.items()}, site)
    return start


def openai_sdk(started):
    """The openai SDK on a proxy process (a Pair's), with the end-to-end key."""
    return openai.OpenAI(base_url=started.url + "/v1", api_key=E2E_KEY, max_retries=0)


@pytest.fixture
async def fake_api(aiohttp_server):
    """The fake official IFM API (FakeIFM) over real HTTP on loopback; any key works until `keys` is set."""
    upstream = FakeIFM()
    server = await aiohttp_server(upstream.app)
    upstream.url = str(server.make_url("")).rstrip("/")
    return upstream


class Served:
    """A fake site and a proxy in front of it on an event loop of their own, with a client of each dialect, streamed
    and not: for the tests hypothesis drives example by example (it runs sync tests only)."""

    def __init__(self, tmp_path):
        self.loop = asyncio.new_event_loop()
        self.fake = FakeK2Think()
        self.tmp_path = tmp_path
        self.servers, self.clients = [], []

    def run(self, coroutine, timeout=30):
        """Runs `coroutine` on this loop, within `timeout` seconds."""
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    async def start(self):
        from aiohttp.test_utils import TestServer
        fake = TestServer(self.fake.app)
        await fake.start_server()
        settings = k2proxy.load_settings({
            "VALID_API_KEY": API_KEY, "ADMIN_KEY": ADMIN_KEY, "K2THINK_BASE_URL": str(fake.make_url("")).rstrip("/"),
            "USER_TOKENS_FILE": str(self.tmp_path / "tokens.txt"), "REQUEST_TIMEOUT": "5",
            "GUEST_TOKENS_FILE": str(self.tmp_path / "tokens_guest.txt")})
        proxy = TestServer(k2proxy.make_app(settings))
        await proxy.start_server()
        self.servers = [proxy, fake]
        url = str(proxy.make_url("")).rstrip("/")
        self.clients = [make(url, stream) for make in CLIENTS.values() for stream in (False, True)]

    async def stop(self):
        for client in self.clients:
            await client.sdk.close()
        for server in self.servers:
            await server.close()


@pytest.fixture
def served(tmp_path):
    served = Served(tmp_path)
    served.run(served.start())
    yield served
    served.run(served.stop())
    served.loop.close()


async def run_check(settings):
    """`python k2proxy.py --check`'s report for `settings`, run in-process with a session of its own."""
    http = k2proxy.HttpClient(settings)
    await http.open()
    try:
        return await asyncio.wait_for(k2proxy.check_upstream(settings, http), 20)
    finally:
        await http.stop()


REDIS_INSTALL = "apt-get install redis-server (Debian's package)"


class RedisServer:
    """A real redis-server on a free port, with nothing saved to disk; stop() and start() again keep the port."""

    def __init__(self, workdir):
        self.program = need_program("redis-server", REDIS_INSTALL)
        self.port, self.workdir, self.process = free_port(), workdir, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.process = subprocess.Popen([self.program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.workdir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_port(self.port, self.process)

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server (Debian's package), stopped after the test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


def http_json(method, url, body=None, key=E2E_KEY, timeout=10):
    """(status, JSON body) of one request to a process, with `key` as the Bearer key."""
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


E2E_ADMIN_KEY = "admin-e2e"


class Replicas(Pair):
    """A fake upstream process and `count` proxy processes sharing one Redis, each in a working directory of its
    own holding its own copy of `files`: nothing but Redis is shared between them."""

    def __init__(self, spawn, tmp_path, redis, count, env, files, api=False):
        self.upstream_port = free_port()
        kind = ["--api"] if api else ["--site", "k2horizon"]
        spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(self.upstream_port), *kind],
              self.upstream_port)
        upstream = f"http://127.0.0.1:{self.upstream_port}"
        self.urls, self.processes, self.homes = [], [], []
        for number in range(count):
            port, home = free_port(), tmp_path / f"replica{number}"
            home.mkdir()
            for name, text in files.items():
                (home / name).write_text(text)
            self.processes.append(spawn([str(ROOT / "k2proxy.py")], port, cwd=home, env={
                "PORT": str(port), "HOST": "127.0.0.1", "VALID_API_KEY": E2E_KEY, "ADMIN_KEY": E2E_ADMIN_KEY,
                "REDIS_URL": redis.url, "K2THINK_BASE_URL": upstream, "IFM_BASE_URL": upstream + "/v1",
                "REQUEST_TIMEOUT": "10", **env}))
            self.urls.append(f"http://127.0.0.1:{port}")
            self.homes.append(home)

    def call(self, replica, method, path, body=None, key=E2E_KEY):
        """(status, JSON body) of a request to replica number `replica`."""
        return http_json(method, self.urls[replica] + path, body, key)

    def admin(self, replica, method, path, body=None):
        return self.call(replica, method, path, body, E2E_ADMIN_KEY)


@pytest.fixture
def replicas(spawn, tmp_path, redis_server):
    """Starts a fake upstream and proxy processes sharing the test's Redis; keyword arguments are their settings."""
    def start(count=2, api=False, files=None, **env):
        return Replicas(spawn, tmp_path, redis_server, count, {key: str(value) for key, value in env.items()},
                        files or {}, api)
    return start


# ─── clients of each dialect through the official SDKs, reading (answer, reasoning) as users see them

class ChatClient:
    """Chat completions through AsyncOpenAI; a stream is joined delta by delta, as plain clients do."""

    def __init__(self, url, stream):
        self.sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=20)
        self.stream = stream

    @staticmethod
    def user(content):
        return {"role": "user", "content": content}

    @staticmethod
    def turn(text, reasoning):
        return [{"role": "assistant", "content": text, "reasoning_content": reasoning}]

    async def ask(self, history, **options):
        """(answer, reasoning) as the client shows them."""
        options = {"model": MODEL, "messages": history, **options}
        if not self.stream:
            message = (await self.sdk.chat.completions.create(**options)).choices[0].message
            return message.content or "", getattr(message, "reasoning_content", None) or ""
        text, reasoning = [], []
        async for chunk in await self.sdk.chat.completions.create(**options, stream=True):
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
        return "".join(text), "".join(reasoning)


class AnthropicClient:
    """Anthropic Messages through AsyncAnthropic, thinking on; a stream is read by the SDK's own accumulator."""

    def __init__(self, url, stream):
        self.sdk = anthropic.AsyncAnthropic(base_url=url, api_key=API_KEY, max_retries=0,
                                            timeout=20)
        self.stream = stream

    @staticmethod
    def user(content):
        return {"role": "user", "content": content}

    @staticmethod
    def turn(text, reasoning):
        return [{"role": "assistant", "content": [{"type": "thinking", "thinking": reasoning, "signature": "sig"},
                                                  {"type": "text", "text": text}]}]

    async def ask(self, history, **options):
        options = {"model": MODEL, "max_tokens": 4096, "messages": history,
                   "thinking": {"type": "enabled", "budget_tokens": 20000}, **options}
        options = {name: value for name, value in options.items() if value is not None}
        if self.stream:
            async with self.sdk.messages.stream(**options) as stream:
                message = await stream.get_final_message()
        else:
            message = await self.sdk.messages.create(**options)
        return ("".join(b.text for b in message.content if b.type == "text"),
                "".join(b.thinking for b in message.content if b.type == "thinking"))


class ResponsesClient:
    """Responses through AsyncOpenAI, summary asked; a stream is read by the SDK's own accumulator."""

    def __init__(self, url, stream):
        self.sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=20)
        self.stream = stream

    @staticmethod
    def user(content):
        return {"role": "user", "content": content}

    @staticmethod
    def turn(text, reasoning):
        return [{"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": reasoning}]},
                {"role": "assistant", "content": text}]

    async def ask(self, history, **options):
        options = {"model": MODEL, "input": history, "reasoning": {"summary": "auto"}, **options}
        options = {name: value for name, value in options.items() if value is not None}
        if self.stream:
            async with self.sdk.responses.stream(**options) as stream:
                response = await stream.get_final_response()
        else:
            response = await self.sdk.responses.create(**options)
        summaries = [part.text for item in response.output if item.type == "reasoning" for part in item.summary]
        return response.output_text, "".join(summaries)


CLIENTS = {"chat": ChatClient, "anthropic": AnthropicClient, "responses": ResponsesClient}
