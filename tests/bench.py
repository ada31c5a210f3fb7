#!/usr/bin/env python3
"""What the proxy costs: the fake upstream directly and through k2proxy, side by side, in one run.

Usage: python tests/bench.py [--quick]
Starts the fake upstream and the proxy as processes on 127.0.0.1 and prints markdown: time to first
content, streamed and non-streamed throughput (direct and by each completion route), proxy CPU for long
snapshot answers, proxy memory, the targets, what each completion's bookkeeping costs, and the rate of
every other route; then the same for the official API's upstream kind (the fake API directly and through a
second proxy with UPSTREAM=api). Timing misses are reported, not failed; the exit status is non-zero only
when requests failed.
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from fake_upstream import make_jwt

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench"  # a named key of API_KEYS_FILE, with limits it never reaches: its bookkeeping is in every figure
ADMIN_KEY = "sk-bench-admin"
MODEL = "IFM/K2-Horizon-375B-A23B"
TICKS = os.sysconf("SC_CLK_TCK")
FIRST_WORDS = b"Pondering"  # the model's first word: the site's first frames hold only markup
IDLE_MEMORY_MB = 55  # a plain start; about 12 MB of it is what CPython keeps after compiling the script
FAKE, PROXY = str(ROOT / "tests" / "fake_upstream.py"), str(ROOT / "k2proxy.py")
IFM_KEY = "IFM-bench"  # the fake API's one key, and the API proxy's
CPU_LENGTHS = (20000, 40000)  # characters of the answers whose proxy CPU is compared


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args, port, env=None, cwd=None):
    """Starts a process and waits until it listens on `port`."""
    process = subprocess.Popen([sys.executable, *args], env={**os.environ, **(env or {})}, cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{args[0]} did not start")


@contextlib.contextmanager
def running(args, port, env=None, cwd=None):
    """A process started by `start`, stopped when the block ends."""
    process = start(args, port, env, cwd)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(10)


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
API_ROUTES = {  # the fake API asked directly as the proxy asks it, and the proxy's routes in front of it
    "direct": ("/v1/chat/completions", lambda stream: {"model": MODEL, "stream": True, "messages": HELLO,
                                                      "stream_options": {"include_usage": True},
                                                      "chat_template_kwargs": {"reasoning_effort": "high"}},
               b"data: [DONE]"),
    **{route: ROUTES[route] for route in PROXIED}}
API_HEADERS = {"Authorization": f"Bearer {IFM_KEY}", "X-Session-ID": "bench"}
API_BUDGETS = {"daily_budget": 10 ** 15, "minute_budget": 10 ** 15}  # the fake API's token budgets, never reached
BENCH_LIMITS = {"rpm": 10 ** 9, "concurrent": 10 ** 6}  # the bench key's, never reached
BENCH_KEYS = {"keys": [{"name": "bench", "key": KEY, **BENCH_LIMITS}]}
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

    def __init__(self, session, upstream_port, proxy_port, proxy_pid, routes=ROUTES, direct_headers=None):
        self.session = session
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

    async def one(self, route, stream=True, first_only=False):
        """(seconds to first content, seconds in all) of one request by `route`; failures are recorded."""
        path, body, end = self.routes[route]
        base, headers = ((self.upstream, self.direct_headers) if route == "direct"
                         else (self.proxy, {"Authorization": f"Bearer {KEY}"}))
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
        """Requests per second and p99 latency at `concurrency` by each route."""
        await self.steer(reasoning="r" * 600, answer="a" * 600, piece=12, delay=0)
        figures = {}
        for route in routes:
            latencies = []
            started = time.perf_counter()
            for _ in range(rounds):
                results = await asyncio.gather(*(self.one(route, stream) for _ in range(concurrency)))
                latencies += [total for _, total in results if total is not None]
                if route != "direct":
                    peak[0] = max(peak[0], rss_mb(self.proxy_pid))
            figures[route] = (len(latencies) / (time.perf_counter() - started), percentile(latencies, 0.99) * 1000)
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

    async def cpu_for(self, length, runs):
        """Proxy CPU seconds for one streamed answer of `length` characters in 200 frames (the site's snapshots, or
        the API's chunks), averaged over `runs` answers (the kernel counts CPU time in 10 ms ticks)."""
        await self.steer(reasoning="r" * (length // 2), answer="a" * (length // 2), piece=max(1, length // 200),
                         delay=0, style="snapshot", markup="details", usage=None)
        before = cpu_seconds(self.proxy_pid)
        for _ in range(runs):
            await self.one("/v1/chat/completions")
        return (cpu_seconds(self.proxy_pid) - before) / runs

    async def cpu_growth(self, runs):
        """Proxy CPU seconds for an answer of each of CPU_LENGTHS."""
        return {length: await self.cpu_for(length, runs) for length in CPU_LENGTHS}

    async def watch_peak(self, peak, stop):
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(self.proxy_pid))
            await asyncio.sleep(0.05)


def bookkeeping_microseconds(count):
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
        keys.admit(key)
        monitor.begin(record)
        monitor.end(record, 200)
        keys.done(key)
    return (time.perf_counter() - started) / count * 1e6


def mark(ok):
    return "met" if ok else "MISSED"


@contextlib.contextmanager
def benched(session, files, fake_args, upstream, **how):
    """A Bench of the fake upstream and a proxy in front of it, both processes started in `files`; `upstream(url)`
    is the proxy's settings that point it at the fake at `url`, `how` what Bench takes besides."""
    upstream_port, proxy_port = free_port(), free_port()
    url = f"http://127.0.0.1:{upstream_port}"
    with (running([FAKE, "--port", str(upstream_port), *fake_args], upstream_port, cwd=files),
          running([PROXY], proxy_port, proxy_env(files, proxy_port, **upstream(url)), cwd=files) as proxy):
        yield Bench(session, upstream_port, proxy_port, proxy.pid, **how)


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
    return (ttfb, paused, streamed, plain, cpu, idle, peak[0], bench.errors), services


async def api_figures(session, files, samples, rounds, runs):
    """The API's upstream kind: the fake API directly and through a proxy with UPSTREAM=api and one key; the
    figures `report_api` takes."""
    with benched(session, files, ["--api", "--keys", IFM_KEY],
                 lambda url: {"UPSTREAM": "api", "IFM_API_KEY": IFM_KEY, "IFM_BASE_URL": url + "/v1"},
                 routes=API_ROUTES, direct_headers=API_HEADERS) as bench:
        await bench.fake("/_fake/config", API_BUDGETS)
        peak = [rss_mb(bench.proxy_pid)]
        alone = await bench.ttfb(samples, API_ROUTES)
        crowded = await bench.ttfb(samples, API_ROUTES, concurrency=32)
        streamed = await bench.throughput(32, rounds * 2, True, peak, API_ROUTES)  # as many requests as the site's
        cpu = await bench.cpu_growth(runs * 5)  # a chunk costs less than a snapshot: more answers for the 10 ms ticks
    return alone, crowded, streamed, cpu, peak[0], bench.errors


async def run(quick):
    samples, rounds, runs = (20, 3, 10) if quick else (60, 10, 40)
    files = Path(tempfile.mkdtemp(prefix="k2proxy-bench-"))
    limits = " ".join(f"{name}={value}" for name, value in BENCH_LIMITS.items())
    (files / "api_keys.txt").write_text(f"bench:{KEY} {limits}\n")
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            site, services = await site_figures(session, files, quick, samples, rounds, runs)
            api = await api_figures(session, files, samples, rounds, runs)
    finally:
        shutil.rmtree(files)
    report(quick, *site)
    report_services(services, bookkeeping_microseconds(2000 if quick else 20000))
    report_api(*api)
    return 1 if site[-1] or api[-1] else 0


def row(name, figures, unit="", digits=1, routes=("direct", *PROXIED), sign=""):
    cells = " | ".join(f"{figures[r]:{sign}.{digits}f}{unit}" if r in figures else "" for r in routes)
    return f"| {name} | {cells} |"


def part(figures, index):
    """One figure of each route's: 0 the p50 or the rate, 1 the p99."""
    return {route: values[index] for route, values in figures.items()}


def table_head(first="metric"):
    print(f"| {first} | direct | " + " | ".join(f"`{route}`" for route in PROXIED) + " |")
    print("|---|" + "---:|" * (1 + len(PROXIED)))


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


def report(quick, ttfb, paused, streamed, plain, cpu, idle, peak, errors):
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
    print(f"| idle memory at most {IDLE_MEMORY_MB} MB, a plain start | {idle:.1f} MB "
          f"| {mark(idle <= IDLE_MEMORY_MB)} |")
    error_rows(errors)


def report_api(alone, crowded, streamed, cpu, peak, errors):
    """The API's upstream kind: the fake API directly against the proxy's three routes in front of it."""
    def overheads(ttfb):
        return {route: ttfb[route][0] - ttfb["direct"][0] for route in PROXIED}
    print("\n### The official API (UPSTREAM=api)\n")
    print("The fake API asked directly (a streamed chat completion, as the proxy asks it) and through a second "
          "proxy with UPSTREAM=api and one IFM key:\n")
    table_head()
    print(row("time to first content, p50, 1 at once (slow upstream: 50 ms between chunks)", part(alone, 0), " ms"))
    print(row("time to first content, p50, 32 at once", part(crowded, 0), " ms"))
    print(row("first-content overhead over direct, p50, 1 at once", overheads(alone), " ms", sign="+"))
    print(row("first-content overhead over direct, p50, 32 at once", overheads(crowded), " ms", sign="+"))
    print(row("streamed requests/s, 32 concurrent, 100 chunks", part(streamed, 0), digits=0))
    print(row("streamed latency p99, 32 concurrent", part(streamed, 1), " ms", 0))
    print()
    print(f"{cpu_sentence(cpu, 'chunks')} Proxy resident memory at peak under load: {peak:.1f} MB. "
          f"Errors: {len(errors)}.\n")
    print("| target | figure | |")
    print("|---|---|---|")
    for route, extra in overheads(alone).items():
        print(f"| `{route}` first-content overhead at most 3 ms at p50, 1 at once | {extra:+.1f} ms "
              f"| {mark(extra <= 3)} |")
    throughput_targets(streamed)
    error_rows(errors)


def report_services(services, bookkeeping):
    print(f"\nBookkeeping per completion (request log, counters, histograms, the minute, the key's limits): "
          f"{bookkeeping:.1f} µs.")
    print("\nEvery other route, 16 at once (those that write a file, delete or ask the upstream, fewer times):\n")
    print("| route | requests/s | p99 |")
    print("|---|---:|---:|")
    for name, (rate, p99) in services.items():
        print(f"| `{name}` | {rate:,.0f} | {p99:.1f} ms |")


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
