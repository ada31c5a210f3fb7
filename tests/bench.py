#!/usr/bin/env python3
"""What the proxy costs: the fake upstream directly and through k2proxy, side by side, in one run.

Usage: python tests/bench.py [--quick]
Starts the fake upstream and the proxy as processes on 127.0.0.1 and prints markdown: time to first content,
streamed and non-streamed throughput (direct and by each completion route), proxy CPU for long snapshot answers,
proxy memory, the targets, what each completion's bookkeeping costs, the rate of every other route, and PDF pages
read a second with other requests' latency meanwhile; then the same for the official API's upstream kind (the fake
API directly, through the floor of tests/passthrough.py, and through a second proxy with UPSTREAM=api); then, with
a redis-server of its own, what REDIS_URL costs a request (a proxy in process and one with REDIS_URL, in turns) and
the streamed rate of WORKERS=1 against WORKERS=2 (skipped, saying why, without redis-server or the redis package).
Timing misses are reported, not failed; the exit status is non-zero only when requests failed.
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from fake_site import make_jwt
from pdfs import pdf

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench"  # a named key of API_KEYS_FILE, with limits it never reaches: its bookkeeping is in every figure
ADMIN_KEY = "sk-bench-admin"
MODEL = "IFM/K2-Horizon-375B-A23B"
TICKS = os.sysconf("SC_CLK_TCK")
FIRST_WORDS = b"Pondering"  # the model's first word: the site's first frames hold only markup
IDLE_MEMORY_MB = 55  # a plain start; about 20 MB of it is what CPython keeps of compiling the script
FAKE, PROXY = str(ROOT / "tests" / "fake_upstream.py"), str(ROOT / "k2proxy.py")
IFM_KEY = "IFM-bench"  # the fake API's one key, and the API proxy's
CPU_LENGTHS = (20000, 40000)  # characters of the answers whose proxy CPU is compared
MIXED_FRAMES = 2000  # frames of the answers whose CPU is compared in both of Open WebUI's frame forms
MIXED = {"realtime_save": True, "markup": "details_plain"}
PDF_PAGES = 100  # MAX_PDF_PAGES's default: the most one read takes
PDF_PAGE_WORDS = 300  # a dense page of prose


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listeners(port):
    """How many sockets listen on `port` of IPv4 loopback (with SO_REUSEPORT, one a worker)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in list(table)[1:]]
    return sum(1 for row in rows if row[1] == f"0100007F:{port:04X}" and row[3] == "0A")  # 0A: LISTEN


def start(command, port, env=None, cwd=None, sockets=1):
    """Starts a process (in a process group of its own, so that what it forks is stopped with it) and waits until
    `sockets` sockets listen on `port`."""
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process.poll() is None:
        if listeners(port) >= sockets:
            return process
        time.sleep(0.05)
    stop_process(process)
    raise RuntimeError(f"{' '.join(command[:2])} did not start")


def stop_process(process):
    """Stops a process that `start` started, and whatever it forked that is still there."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(command, port, env=None, cwd=None, sockets=1):
    """A process started by `start`, stopped when the block ends, however it ends."""
    process = start(command, port, env, cwd, sockets)
    try:
        yield process
    finally:
        stop_process(process)


def proxy_env(files, port, **upstream):
    """The proxy's settings: the bench key's files in `files`, and the upstream that `upstream` names."""
    return {"PORT": str(port), "HOST": "127.0.0.1", "ADMIN_KEY": ADMIN_KEY, "LOG_LEVEL": "WARNING",
            "API_KEYS_FILE": str(files / "api_keys.txt"), "GUEST_TOKENS_FILE": str(files / "tokens_guest.txt"),
            "IFM_KEYS_FILE": str(files / "ifm_keys.txt"), **upstream}


def cpu_seconds(pid):
    """User plus system CPU time of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def percentile(values, share):
    """The value below which `share` of `values` fall; NaN when there are none (every request failed)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


nan = float("nan")
HELLO = [{"role": "user", "content": "Hello"}]
ROUTES = {  # name: (path, request body, the bytes of the line that ends a stream)
    "direct": ("/api/guest/chat/completions", lambda stream: {"stream": True, "model": MODEL, "messages": HELLO,
                                                              "params": {}}, b'data: {"done": true'),
    "/v1/chat/completions": ("/v1/chat/completions", lambda stream: {"model": MODEL, "stream": stream,
                                                                     "messages": HELLO}, b"data: [DONE]"),
    "/v1/messages": ("/v1/messages", lambda stream: {"model": "claude-opus-4-8", "max_tokens": 1000, "stream": stream,
                                                     "messages": HELLO, "thinking": {"type": "adaptive"}},
                     b'data: {"type": "message_stop"'),
    "/v1/responses": ("/v1/responses", lambda stream: {"model": MODEL, "input": "Hello", "stream": stream,
                                                       "reasoning": {"summary": "auto"}},
                      b'data: {"type": "response.completed"'),
}
PROXIED = [name for name in ROUTES if name != "direct"]
FLOOR = "floor"  # the least a proxy on aiohttp can do (tests/passthrough.py), asked what the proxy asks the fake
API_DIRECT = ("/v1/chat/completions", lambda stream: {  # streamed as the proxy asks it; or, to compare, not
    "model": MODEL, "stream": stream, "messages": HELLO, "chat_template_kwargs": {"reasoning_effort": "high"},
    **({"stream_options": {"include_usage": True}} if stream else {})}, b"data: [DONE]")
API_ROUTES = {"direct": API_DIRECT, FLOOR: API_DIRECT, **{route: ROUTES[route] for route in PROXIED}}  # and the
# proxy's routes in front of the fake API
API_COLUMNS = ("direct", FLOOR, *PROXIED)
PASSTHROUGH = str(ROOT / "tests" / "passthrough.py")
API_HEADERS = {"Authorization": f"Bearer {IFM_KEY}", "X-Session-ID": "bench"}
API_BUDGETS = {"daily_budget": 10 ** 15, "minute_budget": 10 ** 15}  # the fake API's token budgets, never reached
BENCH_LIMITS = {"rpm": 10 ** 9, "concurrent": 10 ** 6}  # the bench key's, never reached
BENCH_KEYS = {"keys": [{"name": "bench", "key": KEY, **BENCH_LIMITS}]}
KEYS_LINE = f"bench:{KEY} " + " ".join(f"{name}={value}" for name, value in BENCH_LIMITS.items()) + "\n"
BENCH_TOKEN = make_jwt(time.time() + 86400)  # a guest token, for the routes that reset one
# Every other route: name: (path, or a function of the request's number to its path; body; key; share of the
# request count, for routes that write a file or ask the upstream)
SERVICES = {
    "GET /health": ("/health", None, None, 1),
    "GET /v1/models": ("/v1/models", None, KEY, 1),
    f"GET /v1/models/{MODEL}": (f"/v1/models/{MODEL}", None, KEY, 1),
    "POST /v1/messages/count_tokens": ("/v1/messages/count_tokens", {"model": "claude-opus-4-8", "messages": HELLO},
                                       KEY, 1),
    "GET /v1/responses/{id}": (None, None, KEY, 1),  # its path is set once a response is stored
    "DELETE /v1/responses/{id}": (None, None, KEY, 1 / 4),
    "GET /metrics": ("/metrics", None, ADMIN_KEY, 1),
    "GET /admin/status": ("/admin/status", None, ADMIN_KEY, 1),
    "GET /admin/tokens/stats": ("/admin/tokens/stats", None, ADMIN_KEY, 1),
    "GET /admin/tokens/content": ("/admin/tokens/content", None, ADMIN_KEY, 1),
    "GET /admin/accounts": ("/admin/accounts", None, ADMIN_KEY, 1),
    "GET /admin/requests": ("/admin/requests", None, ADMIN_KEY, 1),
    "GET /admin/history": ("/admin/history", None, ADMIN_KEY, 1),
    "GET /admin/keys": ("/admin/keys", None, ADMIN_KEY, 1),
    "POST /admin/keys/update": ("/admin/keys/update", BENCH_KEYS, ADMIN_KEY, 1 / 20),
    "POST /admin/tokens/reload": ("/admin/tokens/reload", {}, ADMIN_KEY, 1),
    "POST /admin/tokens/reset-all": ("/admin/tokens/reset-all", {}, ADMIN_KEY, 1),
    "POST /admin/tokens/update": ("/admin/tokens/update", {"tokens": [BENCH_TOKEN]}, ADMIN_KEY, 1 / 20),
    "POST /admin/tokens/reset/{index}": ("/admin/tokens/reset/0", {}, ADMIN_KEY, 1),
    "POST /admin/switch_mode": ("/admin/switch_mode", {"mode": "guest"}, ADMIN_KEY, 1),
    "GET /admin/ifm-keys/stats": ("/admin/ifm-keys/stats", None, ADMIN_KEY, 1),
    "GET /admin/ifm-keys/content": ("/admin/ifm-keys/content", None, ADMIN_KEY, 1),
    "POST /admin/ifm-keys/update": ("/admin/ifm-keys/update", {"tokens": [IFM_KEY]}, ADMIN_KEY, 1 / 20),
    "POST /admin/ifm-keys/reset/{index}": ("/admin/ifm-keys/reset/0", {}, ADMIN_KEY, 1),
    "POST /admin/ifm-keys/reset-all": ("/admin/ifm-keys/reset-all", {}, ADMIN_KEY, 1),
    "POST /admin/ifm-keys/reload": ("/admin/ifm-keys/reload", {}, ADMIN_KEY, 1),
    "GET /": ("/", None, None, 1),
    "GET /admin (the page)": ("/admin", None, None, 1),
    "POST /admin/check": ("/admin/check", {}, ADMIN_KEY, 1 / 50),
}


class Bench:
    """One run: the two processes, a client session, the figures and the errors. `routes` and `direct_headers` say
    how the fake upstream is asked directly (the site's, or with API_ROUTES and API_HEADERS the API's)."""

    def __init__(self, session, upstream_port, proxy_port, proxy_pid, routes=ROUTES, direct_headers=None,
                 upstream_pid=None, floor=None):
        self.session = session
        self.floor = floor  # (port, pid) of tests/passthrough.py in front of the fake, for the route FLOOR
        self.upstream_pid = upstream_pid  # the fake's process, whose CPU is direct's cost
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.proxy = f"http://127.0.0.1:{proxy_port}"
        self.proxy_pid = proxy_pid
        self.routes = routes
        self.direct_headers = direct_headers or {}
        self.errors = []

    async def fake(self, path, settings):
        """Steers the fake upstream (its reply, or its config); a refusal is recorded."""
        async with self.session.post(self.upstream + path, json=settings) as response:
            await response.read()
            if response.status != 200:
                self.errors.append(f"POST {path} to the fake: HTTP {response.status}")

    async def steer(self, **reply):
        await self.fake("/_fake/reply", reply)

    def target(self, route):
        """(base URL, headers, process whose CPU is the route's cost) of `route`."""
        if route == "direct":
            return self.upstream, self.direct_headers, self.upstream_pid
        if route == FLOOR:
            return f"http://127.0.0.1:{self.floor[0]}", self.direct_headers, self.floor[1]
        return self.proxy, {"Authorization": f"Bearer {KEY}"}, self.proxy_pid

    async def one(self, route, stream=True, first_only=False):
        """(seconds to first content, seconds in all) of one request by `route`; failures are recorded."""
        path, body, end = self.routes[route]
        base, headers, _ = self.target(route)
        started = time.perf_counter()
        first = None
        try:
            async with self.session.post(base + path, json=body(stream), headers=headers) as response:
                if response.status != 200:
                    self.errors.append(f"{route}: HTTP {response.status}")
                    return None, None
                if response.content_type == "application/json":  # the proxy's non-streamed answer
                    await response.read()
                    return time.perf_counter() - started, time.perf_counter() - started
                done = False
                async for line in response.content:
                    if first is None and FIRST_WORDS in line:
                        first = time.perf_counter() - started
                        if first_only:
                            return first, first
                    if line.startswith(end):  # the site hangs up after its end, so nothing more is read
                        done = True
                        break
                if not done:
                    self.errors.append(f"{route}: stream without its end")
        except aiohttp.ClientError as exc:
            self.errors.append(f"{route}: {type(exc).__name__}")
            return None, None
        return first, time.perf_counter() - started

    async def drain(self, route):
        """One streamed request by `route`, read as it comes (no line is parsed, which leaves the proxy more of the
        CPU the load generator shares with it); whether it ended well (a failure is recorded)."""
        path, body, end = self.routes[route]
        base, headers, _ = self.target(route)
        try:
            async with self.session.post(base + path, json=body(True), headers=headers) as response:
                if response.status != 200:
                    self.errors.append(f"{route}: HTTP {response.status}")
                    return False
                tail = b""
                async for chunk in response.content.iter_any():
                    if end in chunk or end in tail + chunk[:len(end)]:
                        return True
                    tail = chunk[-len(end):]
                self.errors.append(f"{route}: stream without its end")
        except aiohttp.ClientError as exc:
            self.errors.append(f"{route}: {type(exc).__name__}")
        return False

    async def lanes(self, route, concurrency, seconds):
        """(requests that ended well, seconds) of `concurrency` lanes each asking `route` again as soon as its last
        request ended, for `seconds` (the requests under way then are finished and counted)."""
        deadline, done = time.perf_counter() + seconds, [0]

        async def lane():
            while time.perf_counter() < deadline:
                ended = await self.drain(route)  # not `done[0] += await`: it would add to a stale count
                done[0] += ended
        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        return done[0], time.perf_counter() - started

    async def ttfb(self, samples, routes, concurrency=1, **shape):
        """p50 and p99 time to first content by each route, with a slow upstream, `concurrency` requests at once."""
        await self.steer(reasoning=FIRST_WORDS.decode() + "r" * 400, answer="a" * 400, piece=20, delay=0.05, **shape)
        figures = {}
        for route in routes:
            values = []
            for _ in range(-(-samples // concurrency)):
                results = await asyncio.gather(*(self.one(route, first_only=True) for _ in range(concurrency)))
                values += [first for first, _ in results if first is not None]
            median = statistics.median(values) if values else float("nan")
            figures[route] = (median * 1000, percentile(values, 0.99) * 1000)
        return figures

    async def throughput(self, concurrency, rounds, stream, peak, routes):
        """Requests per second, p99 latency and CPU milliseconds a request (the proxy's; the fake's for direct) at
        `concurrency` by each route."""
        await self.steer(reasoning="r" * 600, answer="a" * 600, piece=12, delay=0)
        figures = {}
        for route in routes:
            latencies = []
            serving = self.target(route)[2]
            started, cpu = time.perf_counter(), cpu_seconds(serving) if serving else 0.0
            for _ in range(rounds):
                results = await asyncio.gather(*(self.one(route, stream) for _ in range(concurrency)))
                latencies += [total for _, total in results if total is not None]
                if route in PROXIED:
                    peak[0] = max(peak[0], rss_mb(self.proxy_pid))
            cpu_ms = (cpu_seconds(serving) - cpu) * 1000 / max(1, len(latencies)) if serving else float("nan")
            figures[route] = (len(latencies) / (time.perf_counter() - started), percentile(latencies, 0.99) * 1000,
                              cpu_ms)
        return figures

    async def stored_responses(self, count):
        """The ids of `count` responses stored by the proxy, for the routes that read and delete them."""
        await self.steer(reasoning="r" * 60, answer="a" * 60, piece=12, delay=0)
        ids = []
        for _ in range(0, count, 32):
            ids += await asyncio.gather(*(self.service("POST", "/v1/responses", {"model": MODEL, "input": "Hello"},
                                                       KEY) for _ in range(32)))
        return [answer["id"] for answer in ids if answer]

    async def service(self, method, path, body, key):
        """One request to a route that answers JSON or text at once; its answer, or None (recorded) when it fails."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            async with self.session.request(method, self.proxy + path, json=body, headers=headers) as response:
                answer = await response.read()
                if response.status != 200:
                    self.errors.append(f"{method} {path}: HTTP {response.status}")
                    return None
                return json.loads(answer) if response.content_type == "application/json" else answer
        except aiohttp.ClientError as exc:
            self.errors.append(f"{method} {path}: {type(exc).__name__}")
            return None

    async def timed(self, method, path_of, body, key, total, lanes):
        """Latencies of the requests numbered 0 to `total` - 1, made over `lanes` concurrent lanes (a failed request
        is recorded by `service` and not timed)."""
        latencies = []

        async def lane(first):
            for number in range(first, total, lanes):
                started = time.perf_counter()
                if await self.service(method, path_of(number), body, key) is not None:
                    latencies.append(time.perf_counter() - started)
        await asyncio.gather(*(lane(first) for first in range(lanes)))
        return latencies

    async def documents(self, samples, reads):
        """A PDF of PDF_PAGES pages sent by /v1/chat/completions: pages read a second (the request's time less that
        of the same request without the document, `reads` times), and the p50 and p99 time to first content of
        other requests, one at a time, alone and while reads go on back to back."""
        await self.steer(reasoning=FIRST_WORDS.decode() + "r" * 60, answer="a" * 60, piece=12, delay=0)
        document = base64.b64encode(pdf([f"Page {number}. " + "The quick brown fox jumps. " * (PDF_PAGE_WORDS // 5)
                                         for number in range(PDF_PAGES)])).decode()
        attached = {"type": "file", "file": {"filename": "bench.pdf",
                                              "file_data": "data:application/pdf;base64," + document}}

        async def asked(parts):
            started = time.perf_counter()
            body = {"model": MODEL, "messages": [{"role": "user", "content": parts}]}
            headers = {"Authorization": f"Bearer {KEY}"}
            async with self.session.post(self.proxy + "/v1/chat/completions", json=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    self.errors.append(f"a PDF read: HTTP {response.status}")
            return time.perf_counter() - started
        question = {"type": "text", "text": "Summarise it."}
        plain = statistics.median([await asked([question]) for _ in range(reads)])
        read = statistics.median([await asked([question, attached]) for _ in range(reads)])

        async def others():
            values = [first for first, _ in [await self.one("/v1/chat/completions", first_only=True)
                                             for _ in range(samples)] if first is not None]
            return statistics.median(values) * 1000, percentile(values, 0.99) * 1000
        alone = await others()
        stop = asyncio.Event()

        async def reading():
            while not stop.is_set():
                await asked([question, attached])
        reader = asyncio.ensure_future(reading())
        await asyncio.sleep(0.05)  # the first read under way
        during = await others()
        stop.set()
        await reader
        return PDF_PAGES / (read - plain), read * 1000, alone, during

    async def services(self, count, concurrency):
        """Requests per second and p99 latency of every other route, `count` requests (or its share) each."""
        ids = await self.stored_responses(int(count * SERVICES["DELETE /v1/responses/{id}"][3]) + 1)
        paths = {"GET /v1/responses/{id}": lambda n: f"/v1/responses/{ids[-1]}",
                 "DELETE /v1/responses/{id}": lambda n: f"/v1/responses/{ids[n]}"}
        figures = {}
        for name, (path, body, key, share) in SERVICES.items():
            method, path_of = name.split()[0], paths.get(name, lambda n, path=path: path)
            total = max(1, int(count * share))
            started = time.perf_counter()
            latencies = await self.timed(method, path_of, body, key, total, min(concurrency, total))
            figures[name] = (len(latencies) / (time.perf_counter() - started), percentile(latencies, 0.99) * 1000)
        return figures

    async def cpu_for(self, length, runs, frames=200, **reply):
        """Proxy CPU seconds for one streamed answer of `length` characters in `frames` frames (the site's
        snapshots, or the API's chunks; `reply` may change the site's configuration), averaged over `runs` answers
        (the kernel counts CPU time in 10 ms ticks)."""
        await self.steer(**{"reasoning": "r" * (length // 2), "answer": "a" * (length // 2),
                            "piece": max(1, length // frames), "delay": 0, "style": "snapshot", "markup": "details",
                            "usage": None, **reply})
        before = cpu_seconds(self.proxy_pid)
        for _ in range(runs):
            await self.one("/v1/chat/completions")
        return (cpu_seconds(self.proxy_pid) - before) / runs

    async def cpu_growth(self, runs, **how):
        """Proxy CPU seconds for an answer of each of CPU_LENGTHS (`how`: see cpu_for)."""
        return {length: await self.cpu_for(length, runs, **how) for length in CPU_LENGTHS}

    async def watch_peak(self, peak, stop):
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(self.proxy_pid))
            await asyncio.sleep(0.05)


async def bookkeeping_microseconds(count):
    """What the figures cost a completion, in process: its log entry, counters, histograms, minute and key limits."""
    sys.path.insert(0, str(ROOT))
    import k2proxy
    settings = k2proxy.load_settings({})
    monitor, keys = k2proxy.Monitor(settings), k2proxy.ApiKeys(settings)
    key = k2proxy.ApiKey("bench", KEY, **BENCH_LIMITS)
    records = [k2proxy.RequestRecord("POST", "/v1/chat/completions", "openai", True, 0.0, model=MODEL, stream=True,
                                     route="/v1/chat/completions", key=key.name, first_content=0.01, duration=0.2,
                                     attempts=1, token_index=0, usage=k2proxy.Usage(10, 20, 0))
               for _ in range(count)]
    started = time.perf_counter()
    for record in records:
        slot = await keys.admit(key)
        monitor.begin(record)
        monitor.end(record, 200)
        keys.done(slot)
    return (time.perf_counter() - started) / count * 1e6


def mark(ok):
    return "met" if ok else "MISSED"


@contextlib.contextmanager
def benched(session, files, fake_args, upstream, **how):
    """A Bench of the fake upstream and a proxy in front of it, both processes started in `files`; `upstream(url)`
    is the proxy's settings that point it at the fake at `url`, `how` what Bench takes besides."""
    upstream_port, proxy_port = free_port(), free_port()
    url = f"http://127.0.0.1:{upstream_port}"
    with (running([sys.executable, FAKE, "--port", str(upstream_port), *fake_args], upstream_port, cwd=files) as fake,
          running([sys.executable, PROXY], proxy_port, proxy_env(files, proxy_port, **upstream(url)),
                  cwd=files) as proxy):
        yield Bench(session, upstream_port, proxy_port, proxy.pid, upstream_pid=fake.pid, **how)


async def site_figures(session, files, quick, samples, rounds, runs):
    """The site's upstream kind: the figures `report` takes, and every other route's."""
    with benched(session, files, [], lambda url: {"UPSTREAM": "site", "K2THINK_BASE_URL": url}) as bench:
        await asyncio.sleep(0.5)
        idle = rss_mb(bench.proxy_pid)
        peak = [idle]
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(bench.watch_peak(peak, stop))
        ttfb = await bench.ttfb(samples, ROUTES, site="k2think")  # the first frame holds words
        paused = await bench.ttfb(samples, ROUTES)  # the 2026 site: words after two markup-only frames
        streamed = await bench.throughput(64, rounds, True, peak, ROUTES)
        plain = await bench.throughput(32, rounds, False, peak, ["direct", "/v1/chat/completions"])
        stop.set()
        await watcher
        services = await bench.services(200 if quick else 2000, 16)
        cpu = await bench.cpu_growth(runs)
        mixed = await bench.cpu_growth(runs, frames=MIXED_FRAMES, **MIXED)
        documents = await bench.documents(samples, 3 if quick else 10) if importlib.util.find_spec("pypdf") else None
    return (ttfb, paused, streamed, plain, cpu, mixed, idle, peak[0], bench.errors), services, documents


async def api_figures(session, files, samples, rounds, runs):
    """The API's upstream kind: the fake API directly and through a proxy with UPSTREAM=api and one key; the
    figures `report_api` takes."""
    with benched(session, files, ["--api", "--keys", IFM_KEY],
                 lambda url: {"UPSTREAM": "api", "IFM_API_KEY": IFM_KEY, "IFM_BASE_URL": url + "/v1"},
                 routes=API_ROUTES, direct_headers=API_HEADERS) as bench, \
            running([sys.executable, PASSTHROUGH, "--port", str(floor_port := free_port()), "--upstream",
                     bench.upstream + "/v1"], floor_port, cwd=files) as floor:
        bench.floor = floor_port, floor.pid
        await bench.fake("/_fake/config", API_BUDGETS)
        peak = [rss_mb(bench.proxy_pid)]
        alone = await bench.ttfb(samples, API_ROUTES)
        crowded = await bench.ttfb(samples, API_ROUTES, concurrency=32)
        streamed = await bench.throughput(32, rounds * 2, True, peak, API_ROUTES)  # as many requests as the site's
        plain = await bench.throughput(32, rounds * 2, False, peak, API_ROUTES)
        cpu = await bench.cpu_growth(runs * 5)  # a chunk costs less than a snapshot: more answers for the 10 ms ticks
    return alone, crowded, streamed, plain, cpu, peak[0], bench.errors


# ─── Replicas: what REDIS_URL costs a request, and WORKERS ───────────────────

CONTINUED = "/v1/responses, continued"  # with previous_response_id: a stored response read back, a new one stored
REPLICA_ROUTES = {"/v1/chat/completions": "`/v1/chat/completions`", "/v1/responses": "`/v1/responses` (stored)",
                  CONTINUED: "`/v1/responses`, previous_response_id"}  # route: its name in the tables
SHORT = {"reasoning": FIRST_WORDS.decode() + "r" * 60, "answer": "a" * 60, "piece": 12, "delay": 0}  # 10 frames
SLOW = {"reasoning": FIRST_WORDS.decode() + "r" * 400, "answer": "a" * 400, "piece": 20, "delay": 0.05,
        "site": "k2think"}  # as `ttfb`: words in the first frame, 50 ms between frames
TURN = 10  # requests to one proxy before the other's turn
WORKERS_CONCURRENCY = 32
IN_PROCESS = "in process, no REDIS_URL"


def replicas_missing():
    """Why the figures of REDIS_URL and WORKERS cannot be taken on this machine, or None."""
    if not shutil.which("redis-server"):
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    if importlib.util.find_spec("redis") is None:
        return "the redis package is not installed (pip install -r requirements-redis.txt)"
    return None


@contextlib.contextmanager
def redis_server(files):
    """A redis-server of the bench's own on a free port, saving nothing: (its URL, a client, its process)."""
    import redis
    port = free_port()
    with running(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                  "--dir", str(files)], port) as process:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            yield f"redis://127.0.0.1:{port}/0", client, process
        finally:
            client.close()


def start_proxy(stack, session, files, name, upstream_port, sockets=1, **settings):
    """A Bench of a proxy in front of the fake at `upstream_port`, started in a directory `name` of its own with the
    bench key's file, and stopped when `stack` closes."""
    place, port = files / name, free_port()
    place.mkdir()
    (place / "api_keys.txt").write_text(KEYS_LINE)
    env = proxy_env(place, port, UPSTREAM="site", K2THINK_BASE_URL=f"http://127.0.0.1:{upstream_port}", **settings)
    process = stack.enter_context(running([sys.executable, PROXY], port, env, place, sockets))
    return Bench(session, upstream_port, port, process.pid)


def start_fake(stack, files):
    """The fake site, stopped when `stack` closes: (its port, its process)."""
    port = free_port()
    return port, stack.enter_context(running([sys.executable, FAKE, "--port", str(port)], port, cwd=files))


async def on_redis(bench):
    """Waits until the proxy's /health says that it reaches Redis (until then it would count limits in process)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = await bench.service("GET", "/health", None, None)
        if health and health.get("redis") == "ok":
            return
        await asyncio.sleep(0.1)
    bench.errors.append(f"{bench.proxy}: never reached Redis")


async def add_continued(bench):
    """Stores a response in the proxy, and gives the bench a route that continues it (previous_response_id)."""
    stored = await bench.service("POST", "/v1/responses", {"model": MODEL, "input": "Hello"}, KEY)
    path, body, end = ROUTES["/v1/responses"]
    previous = stored["id"] if stored else "resp_none"
    bench.routes = {**ROUTES, CONTINUED: (path, lambda stream: {**body(stream), "previous_response_id": previous},
                                          end)}


async def in_turns(benches, routes, samples, first_only):
    """Seconds to first content (or, not `first_only`, to the end) of `samples` requests by each of `routes` to
    each of `benches`, one at a time, the benches taking turns of TURN requests, so that what the machine does
    meanwhile falls on each alike."""
    values = {(name, route): [] for name in benches for route in routes}
    for _ in range(-(-samples // TURN)):
        for route in routes:
            for name, bench in benches.items():
                for _ in range(TURN):
                    first, total = await bench.one(route, first_only=first_only)
                    value = first if first_only else total
                    if value is not None:
                        values[name, route].append(value)
    return values


async def redis_cost(session, files, redis_url, client, redis_pid, samples):
    """A proxy in process and one with REDIS_URL, each with the bench key (its limits are what Redis keeps), in
    front of one fake: first content with a slow upstream, and the whole request of a short answer (whose
    response, by /v1/responses, is stored before its end); the figures `report_redis_cost` takes."""
    with contextlib.ExitStack() as stack:
        upstream_port, fake = start_fake(stack, files)
        benches = {"in process": start_proxy(stack, session, files, "in-process", upstream_port),
                   "with REDIS_URL": start_proxy(stack, session, files, "with-redis", upstream_port,
                                                 REDIS_URL=redis_url)}
        shared = benches["with REDIS_URL"]
        await on_redis(shared)
        await shared.steer(**SHORT)
        for bench in benches.values():
            await add_continued(bench)
        await in_turns(benches, REPLICA_ROUTES, TURN, False)  # warm: connections, the scripts loaded in Redis
        client.config_resetstat()
        ours = {"ours": [fake.pid, redis_pid, *(bench.proxy_pid for bench in benches.values())]}
        started, before = time.monotonic(), cpu_now(ours)
        await shared.steer(**SLOW)
        firsts = await in_turns(benches, REPLICA_ROUTES, samples, True)
        await shared.steer(**SHORT)
        cpu = {name: cpu_seconds(bench.proxy_pid) for name, bench in benches.items()}
        ends = await in_turns(benches, REPLICA_ROUTES, samples, False)
        requests = len(REPLICA_ROUTES) * -(-samples // TURN) * TURN
        cpu = {name: (cpu_seconds(bench.proxy_pid) - cpu[name]) / requests for name, bench in benches.items()}
        await asyncio.sleep(0.6)  # the slots given back after the last answers
        commands = {name.removeprefix("cmdstat_"): (stats["calls"], stats["usec_per_call"])
                    for name, stats in client.info("commandstats").items() if name != "cmdstat_config|resetstat"}
        after, seconds = cpu_now(ours), time.monotonic() - started
        rest = (after["machine"] - before["machine"] - sum(after[part] - before[part] for part in ours)
                - (after["load generator"] - before["load generator"])) / seconds
        errors = [*benches["in process"].errors, *shared.errors]
    return firsts, ends, cpu, commands, 2 * requests, seconds, rest, errors


def children(pid):
    """The processes `pid` started (a WORKERS proxy's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:  # it ended meanwhile
                pass
    return sorted(found)


def machine_busy():
    """CPU seconds the whole machine has been busy, every process's (ours and any other's), from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS  # all but idle and iowait


def cpu_now(parts):
    """CPU seconds so far of each part (its processes), of the load generator (this process) and of the machine."""
    return {**{name: sum(map(cpu_seconds, pids)) for name, pids in parts.items()},
            "load generator": time.process_time(), "machine": machine_busy()}


async def workers_throughput(session, files, redis_url, redis_process, windows, seconds):
    """Streamed chat completions, WORKERS_CONCURRENCY kept going, of the fake directly, a proxy in process (no
    REDIS_URL), one with REDIS_URL and WORKERS=1 and one with WORKERS=2 (the same fake and Redis), in turns of
    `seconds`, `windows` turns each; the figures `report_workers` takes: each one's rate, and the cores each process
    used meanwhile."""
    chat = "/v1/chat/completions"
    with contextlib.ExitStack() as stack:
        upstream_port, fake = start_fake(stack, files)
        alone = start_proxy(stack, session, files, "workers-in-process", upstream_port)
        one = start_proxy(stack, session, files, "workers-1", upstream_port, REDIS_URL=redis_url, WORKERS="1")
        two = start_proxy(stack, session, files, "workers-2", upstream_port, sockets=2, REDIS_URL=redis_url,
                          WORKERS="2")
        workers = children(two.proxy_pid)
        common = {"fake upstream": [fake.pid], "redis-server": [redis_process.pid]}
        targets = {"the fake directly": (one, "direct", common),
                   IN_PROCESS: (alone, chat, {"proxy": [alone.proxy_pid], **common}),
                   "WORKERS=1": (one, chat, {"proxy": [one.proxy_pid], **common}),
                   "WORKERS=2": (two, chat, {"proxy": [two.proxy_pid, *workers], **common,
                                             **{f"worker {n}": [pid] for n, pid in enumerate(workers, 1)}})}
        for bench in (one, two):
            await on_redis(bench)
        await one.steer(reasoning="r" * 600, answer="a" * 600, piece=12, delay=0)  # 100 frames, at once
        for bench, route, _ in targets.values():
            await bench.lanes(route, WORKERS_CONCURRENCY, 0.3)  # warm: connections, on both sides of the proxy
        figures = {name: collections.Counter() for name in targets}
        for _ in range(windows):
            for name, (bench, route, parts) in targets.items():
                before = cpu_now(parts)
                done, elapsed = await bench.lanes(route, WORKERS_CONCURRENCY, seconds)
                after = cpu_now(parts)
                figures[name].update({part: after[part] - before[part] for part in after})
                figures[name].update(requests=done, seconds=elapsed)
        errors = [*alone.errors, *one.errors, *two.errors]
    return figures, len(workers), errors


async def replica_figures(session, files, quick):
    """The figures of REDIS_URL and WORKERS, with a redis-server of the bench's own."""
    samples, windows, seconds = (60, 3, 1.0) if quick else (300, 6, 3.0)
    with redis_server(files) as (url, client, process):
        cost = await redis_cost(session, files, url, client, process.pid, samples)
        client.flushall()
        workers = await workers_throughput(session, files, url, process, windows, seconds)
    return cost, workers


async def run(quick):
    samples, rounds, runs = (20, 3, 10) if quick else (60, 10, 40)
    files = Path(tempfile.mkdtemp(prefix="k2proxy-bench-"))
    (files / "api_keys.txt").write_text(KEYS_LINE)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            site, services, documents = await site_figures(session, files, quick, samples, rounds, runs)
            api = await api_figures(session, files, samples, rounds, runs)
            missing, failed = replicas_missing(), None
            if not missing:
                try:
                    cost, workers = await replica_figures(session, files, quick)
                except RuntimeError as exc:  # a process that did not start: the figures above are still printed
                    failed = str(exc)
    finally:
        shutil.rmtree(files)
    report(quick, *site)
    report_services(services, await bookkeeping_microseconds(2000 if quick else 20000))
    report_documents(documents)
    report_api(*api)
    if missing or failed:
        print(f"\n### Replicas (REDIS_URL, WORKERS)\n\n{f'Skipped: {missing}' if missing else f'Failed: {failed}'}.")
        return 1 if site[-1] or api[-1] or failed else 0
    report_redis_cost(*cost)
    report_workers(*workers)
    return 1 if site[-1] or api[-1] or cost[-1] or workers[-1] else 0


def row(name, figures, unit="", digits=1, routes=("direct", *PROXIED), sign=""):
    cells = " | ".join(f"{figures[r]:{sign}.{digits}f}{unit}" if r in figures else "" for r in routes)
    return f"| {name} | {cells} |"


def part(figures, index):
    """One figure of each route's: 0 the p50 or the rate, 1 the p99."""
    return {route: values[index] for route, values in figures.items()}


def table_head(first="metric", routes=("direct", *PROXIED)):
    print(f"| {first} | " + " | ".join(route if route in ("direct", FLOOR) else f"`{route}`" for route in routes)
          + " |")
    print("|---|" + "---:|" * len(routes))


def cpu_growth(cpu):
    return cpu[CPU_LENGTHS[1]] / cpu[CPU_LENGTHS[0]] if cpu[CPU_LENGTHS[0]] else float("nan")


def cpu_sentence(cpu, frames):
    short, long = CPU_LENGTHS
    return (f"Proxy CPU for one streamed answer in 200 {frames}: {cpu[short] * 1000:.0f} ms "
            f"for {short:,} characters, {cpu[long] * 1000:.0f} ms for {long:,} ({cpu_growth(cpu):.2f}x).")


def throughput_targets(streamed):
    for route in PROXIED:
        share = streamed[route][0] / streamed["direct"][0] if streamed["direct"][0] else float("nan")
        print(f"| `{route}` streamed throughput at least 50% of direct | {share:.0%} | {mark(share >= 0.5)} |")


def error_rows(errors):
    print(f"| zero errors | {len(errors)} | {mark(not errors)} |")
    for error in errors[:10]:
        print(f"- error: {error}")


def report(quick, ttfb, paused, streamed, plain, cpu, mixed, idle, peak, errors):
    chat = "/v1/chat/completions"
    overhead = ttfb[chat][0] - ttfb["direct"][0]
    growth = cpu_growth(cpu)
    print(f"## k2proxy benchmark{' (--quick)' if quick else ''}\n")
    print(f"Machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}, "
          f"load generator on the same machine.\n")
    table_head()
    print(row("time to first content, p50 (slow upstream: 50 ms between frames)", part(ttfb, 0), " ms"))
    print(row("time to first content, p99", part(ttfb, 1), " ms"))
    print(row("time to first content, p50, first words after 100 ms of markup (the 2026 site)",
              part(paused, 0), " ms"))
    print(row("streamed requests/s, 64 concurrent, 100 frames", part(streamed, 0), digits=0))
    print(row("streamed latency p99, 64 concurrent", part(streamed, 1), " ms", 0))
    print(row("non-streamed requests/s, 32 concurrent", part(plain, 0), digits=0))
    print()
    print(f"{cpu_sentence(cpu, 'snapshot frames')} Proxy resident memory: {idle:.1f} MB idle, "
          f"{peak:.1f} MB at peak under load. Errors: {len(errors)}.\n")
    print("| target | figure | |")
    print("|---|---|---|")
    print(f"| first-content overhead at most 2 ms at p50 | {overhead:+.1f} ms | {mark(overhead <= 2)} |")
    for route in PROXIED[1:]:
        gap = ttfb[route][0] - ttfb[chat][0]
        print(f"| `{route}` first content within 1 ms of `{chat}` at p50 | {gap:+.1f} ms | {mark(abs(gap) <= 1)} |")
    throughput_targets(streamed)
    print(f"| CPU growth for 2x the answer at most 2.3x | {growth:.2f}x | {mark(growth <= 2.3)} |")
    growth = cpu_growth(mixed)
    print(f"| the same in {MIXED_FRAMES:,} mixed frames (realtime save: reasoning snapshots, answer pieces) "
          f"| {growth:.2f}x | {mark(growth <= 2.3)} |")
    print(f"| idle memory at most {IDLE_MEMORY_MB} MB, a plain start | {idle:.1f} MB "
          f"| {mark(idle <= IDLE_MEMORY_MB)} |")
    error_rows(errors)


API_STREAMED_SHARE, API_PLAIN_SHARE, API_CPU_MS = 0.5, 0.4, 0.5  # issue 39's goals: of direct's rate; per request


def report_api(alone, crowded, streamed, plain, cpu, peak, errors):
    """The API's upstream kind: the fake API directly and through the floor, against the proxy's three routes."""
    def overheads(ttfb):
        return {route: ttfb[route][0] - ttfb["direct"][0] for route in (FLOOR, *PROXIED)}

    def api_row(name, figures, unit="", digits=1, sign=""):
        return row(name, figures, unit, digits, API_COLUMNS, sign)
    print("\n### The official API (UPSTREAM=api)\n")
    print("The fake API asked directly (a streamed chat completion, as the proxy asks it), through the floor (the "
          "least a proxy on aiohttp can do: tests/passthrough.py passes each request and its answer on, reading "
          "nothing) and through a second proxy with UPSTREAM=api and one IFM key:\n")
    table_head(routes=API_COLUMNS)
    print(api_row("time to first content, p50, 1 at once (slow upstream: 50 ms between chunks)", part(alone, 0),
                  " ms"))
    print(api_row("time to first content, p50, 32 at once", part(crowded, 0), " ms"))
    print(api_row("first-content overhead over direct, p50, 1 at once", overheads(alone), " ms", sign="+"))
    print(api_row("first-content overhead over direct, p50, 32 at once", overheads(crowded), " ms", sign="+"))
    print(api_row("streamed requests/s, 32 concurrent, 100 chunks", part(streamed, 0), digits=0))
    print(api_row("streamed latency p99, 32 concurrent", part(streamed, 1), " ms", 0))
    print(api_row("streamed: CPU a request (the fake's for direct)", part(streamed, 2), " ms", 2))
    print(api_row("non-streamed requests/s, 32 concurrent", part(plain, 0), digits=0))
    print(api_row("non-streamed: CPU a request (the fake's for direct)", part(plain, 2), " ms", 2))
    print()
    print(f"{cpu_sentence(cpu, 'chunks')} Proxy resident memory at peak under load: {peak:.1f} MB. "
          f"Errors: {len(errors)}.\n")
    print("| target | figure | |")
    print("|---|---|---|")
    for route in PROXIED:
        extra = overheads(alone)[route]
        print(f"| `{route}` first-content overhead at most 3 ms at p50, 1 at once | {extra:+.1f} ms "
              f"| {mark(extra <= 3)} |")
    goals = (("streamed", streamed, API_STREAMED_SHARE), ("non-streamed", plain, API_PLAIN_SHARE))

    def share(figures, route):
        return figures[route][0] / figures["direct"][0] if figures["direct"][0] else float("nan")
    for route in PROXIED:
        for name, figures, goal in goals:
            print(f"| `{route}` {name} throughput at least {goal:.0%} of direct | {share(figures, route):.0%} "
                  f"(the floor: {share(figures, FLOOR):.0%}) | {mark(share(figures, route) >= goal)} |")
        cpu_ms = streamed[route][2]
        print(f"| `{route}` proxy CPU a streamed request at most {API_CPU_MS} ms | {cpu_ms:.2f} ms (the floor: "
              f"{streamed[FLOOR][2]:.2f} ms) | {mark(cpu_ms <= API_CPU_MS)} |")
    error_rows(errors)


def report_services(services, bookkeeping):
    print(f"\nBookkeeping per completion (request log, counters, histograms, the minute, the key's limits): "
          f"{bookkeeping:.1f} µs.")
    print("\nEvery other route, 16 at once (those that write a file, delete or ask the upstream, fewer times):\n")
    print("| route | requests/s | p99 |")
    print("|---|---:|---:|")
    for name, (rate, p99) in services.items():
        print(f"| `{name}` | {rate:,.0f} | {p99:.1f} ms |")


def report_documents(documents):
    """PDF documents: pages read a second, and what a read under way does to other requests."""
    print("\n### PDF documents\n")
    if documents is None:
        print("Skipped: pypdf is not installed (pip install -r requirements-pdf.txt).")
        return
    rate, seconds, alone, during = documents
    print(f"A {PDF_PAGES}-page PDF ({PDF_PAGE_WORDS} words a page) sent by `/v1/chat/completions` to the proxy above: "
          f"{rate:,.0f} pages read a second (the request took {seconds:,.0f} ms; less the same request without the "
          "document, the read). Time to first content of other requests to `/v1/chat/completions`, one at a time "
         ":\n")
    print("| | p50 | p99 |")
    print("|---|---:|---:|")
    print(f"| alone | {alone[0]:.1f} ms | {alone[1]:.1f} ms |")
    print(f"| while PDFs are read back to back | {during[0]:.1f} ms | {during[1]:.1f} ms |")
    gap = during[0] - alone[0]
    print(f"\n| target | figure | |\n|---|---|---|\n| other requests' first content within 2 ms of alone at p50 "
          f"while a PDF is read | {gap:+.1f} ms | {mark(gap <= 2)} |")


def report_redis_cost(firsts, ends, cpu, commands, requests, seconds, rest, errors):
    """What REDIS_URL costs a request: the same requests to a proxy in process and to one with REDIS_URL."""
    names = ("in process", "with REDIS_URL")

    def figure(values, route, name, share):
        found = values[name, route]
        return (statistics.median(found) if share == 0.5 else percentile(found, share)) * 1000 if found else nan

    def line(label, values, name, share=0.5):
        return f"| {label} | " + " | ".join(f"{figure(values, route, name, share):.2f} ms"
                                           for route in REPLICA_ROUTES) + " |"

    def gap(values, route):
        return figure(values, route, names[1], 0.5) - figure(values, route, names[0], 0.5)

    print("\n### Replicas: what REDIS_URL costs a request\n")
    print("Two proxies in front of one fake site, each with the bench key (named, with rpm and concurrent limits it "
          "never reaches), one in process and one with REDIS_URL (a redis-server on loopback, saving nothing); one "
          f"request at a time, the two proxies taking turns of {TURN}:\n")
    print("| metric | " + " | ".join(REPLICA_ROUTES.values()) + " |")
    print("|---|" + "---:|" * len(REPLICA_ROUTES))
    for share, tail in ((0.5, "p50"), (0.95, "p95")):
        for name in names:
            slow = " (slow upstream: 50 ms between frames)" if (share, name) == (0.5, names[0]) else ""
            print(line(f"time to first content, {tail}, {name}{slow}", firsts, name, share))
    print("| difference at p50 | " + " | ".join(f"{gap(firsts, route):+.2f} ms" for route in REPLICA_ROUTES) + " |")
    for name in names:
        short = " (a short answer: 10 frames at once)" if name == names[0] else ""
        print(line(f"whole request, p50, {name}{short}", ends, name))
    print("| difference at p50 | " + " | ".join(f"{gap(ends, route):+.2f} ms" for route in REPLICA_ROUTES) + " |")
    print()
    print(f"Proxy CPU per whole request (the three routes alike): {cpu[names[0]] * 1000:.2f} ms in process, "
          f"{cpu[names[1]] * 1000:.2f} ms with REDIS_URL. What Redis did in the {seconds:.1f} s of these "
          f"{requests} requests to the proxy with REDIS_URL (INFO commandstats: calls, and the microseconds each "
          "took in Redis): " + ", ".join(f"{name} {calls} ({usec:.1f} µs)" for name, (calls, usec)
                                      in sorted(commands.items(), key=lambda item: -item[1][0])) + ". The rest "
          f"of the machine (the kernel, other processes) used {max(0.0, rest):.2f} cores meanwhile.\n")
    print("| target | figure | |")
    print("|---|---|---|")
    for route, label in REPLICA_ROUTES.items():
        extra = gap(firsts, route)
        print(f"| {label}: first content with REDIS_URL within 1 ms of in process at p50 | {extra:+.2f} ms "
              f"| {mark(abs(extra) <= 1)} |")
    error_rows(errors)


def report_workers(figures, workers, errors):
    """Streamed throughput of WORKERS=1 against WORKERS=2, and the cores each process used meanwhile."""
    def cores(name, part):
        return figures[name][part] / figures[name]["seconds"]

    def rate(name):
        return figures[name]["requests"] / figures[name]["seconds"] if figures[name]["seconds"] else nan

    parts = ("fake upstream", "redis-server", "load generator")
    print(f"\n### WORKERS: processes on one port (REDIS_URL)\n\nStreamed `/v1/chat/completions` (100 frames, sent at "
          f"once), {WORKERS_CONCURRENCY} requests kept going: the fake directly, a proxy in process (no REDIS_URL), "
          "one proxy process with REDIS_URL and WORKERS=1, and one with WORKERS=2 (the same fake and Redis; the bench "
          "key's limits kept in Redis), in turns. CPU in cores (CPU seconds a "
          "second) over the same turns; the rest is the kernel's (loopback networking) and any other process's:\n")
    print("| | requests/s | proxy | proxy CPU per request | " + " | ".join(parts) + " | the rest | machine |")
    print("|---|---:|---:|---:|" + "---:|" * (len(parts) + 2))
    for name in figures:
        proxy = cores(name, "proxy")
        split = " + ".join(f"{cores(name, f'worker {n}'):.2f}" for n in range(1, workers + 1))
        shown = (f"{proxy:.2f}" + (f" ({split})" if name == "WORKERS=2" and workers > 1 else "")) if proxy else ""
        per = f"{proxy / rate(name) * 1000:.2f} ms" if proxy and rate(name) else ""
        others = cores(name, "machine") - proxy - sum(cores(name, part) for part in parts)
        print(f"| {name} | {rate(name):.0f} | {shown} | {per} | "
              + " | ".join(f"{cores(name, part):.2f}" for part in parts)
              + f" | {max(0.0, others):.2f} | {cores(name, 'machine'):.2f} of {os.cpu_count()} |")
    print(f"\nWith REDIS_URL, one worker: {rate('WORKERS=1') / rate(IN_PROCESS):.2f}x the requests a second of the "
          "proxy in process.", end=" ")
    ratio = rate("WORKERS=2") / rate("WORKERS=1") if rate("WORKERS=1") else nan
    direct, fake, busy = rate("the fake directly"), cores("WORKERS=2", "fake upstream"), cores("WORKERS=2", "machine")
    print(f"WORKERS=2 against WORKERS=1: {ratio:.2f}x the requests a second.")
    if fake >= 0.9:
        print(f"The fake upstream is the limit: it used {fake:.2f} of a core with WORKERS=2.")
    else:
        print(f"The fake upstream is not the limit: asked directly it serves {direct:.0f} requests/s, "
              f"{direct / rate('WORKERS=2'):.1f}x what WORKERS=2 passes, and it used {fake:.2f} of a core meanwhile.")
    if busy >= 0.9 * os.cpu_count():
        helpers = busy - cores("WORKERS=2", "proxy")
        print(f"The machine is the limit: its {os.cpu_count()} cores were {busy / os.cpu_count():.0%} busy with "
              f"WORKERS=2, {helpers:.2f} cores of it not the proxy's (the load generator, the fake, Redis, the "
              "kernel), which leaves the workers less than a core each.")
    per_request = figures["WORKERS=1"]["proxy"] / figures["WORKERS=1"]["requests"] if rate("WORKERS=1") else nan
    print(f"At {per_request * 1000:.2f} ms of proxy CPU a request, one worker (a core at most) passes at most "
          f"{1 / per_request:.0f} requests/s of this kind, and each worker with a core of its own as many again.")
    error_rows(errors)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests; under a minute")
    sys.exit(asyncio.run(run(parser.parse_args().quick)))


if __name__ == "__main__":
    main()
