"""The core: the events a completion produces, the writers that gather them, each upstream failure kind's policy
(charge the token? fail over? what does the client get?), and a stream that always ends in its dialect's way."""

import asyncio
import json
import time

import pytest
from conftest import AUTH, DIALECTS, asked, ends_with_error
from fake_site import Reply

import k2proxy
from k2proxy import Failed, Finish, Reasoning, Text, ToolArguments, ToolCallStart, Usage

PLAN = k2proxy.ToolPlan((k2proxy.Tool("search", "Web search.", {"type": "object"}),), "auto")
CALL = '<tool_call>{"name": "search", "arguments": {"q": "k2"}}</tool_call>'


def kinds(events):
    return [type(event).__name__ for event in events]


# ─── Progress: upstream pieces → events ─────────────────────────────────────

def test_reasoning_then_answer_become_their_own_events():
    progress = k2proxy.Progress(None, show_reasoning=True)
    assert progress.events(k2proxy.Delta("Let me think.", "")) == [Reasoning("Let me think.")]
    assert progress.events(k2proxy.Delta("", "Hello")) == [Text("Hello")]
    assert progress.events(k2proxy.Delta("more", " there")) == [Reasoning("more"), Text(" there")]


def test_hidden_reasoning_is_counted_but_not_sent():
    progress = k2proxy.Progress(None, show_reasoning=False)
    assert progress.events(k2proxy.Delta("x" * 400, "ok")) == [Text("ok")]
    finish = progress.closing(prompt_tokens=5)[-1]
    assert finish.usage == Usage(prompt_tokens=5, completion_tokens=100, reasoning_tokens=100)


def test_a_tool_call_is_a_start_and_its_arguments():
    progress = k2proxy.Progress(PLAN, show_reasoning=True)
    events = progress.events(k2proxy.Delta("", "Looking. " + CALL)) + progress.closing(prompt_tokens=1)
    assert kinds(events) == ["Text", "ToolCallStart", "ToolArguments", "Finish"]
    start, arguments, finish = events[1:]
    assert (start.index, start.name) == (0, "search") and len(start.id) == 24
    assert arguments == ToolArguments(0, '{"q": "k2"}') and finish.reason == "tool_calls"


def test_text_held_by_the_scanner_comes_out_at_the_end():
    progress = k2proxy.Progress(PLAN, show_reasoning=True)
    assert progress.events(k2proxy.Delta("", "See <tool_")) == [Text("See ")]
    assert progress.closing(prompt_tokens=1)[:-1] == [Text("<tool_")]


@pytest.mark.parametrize("upstream,expected", [(None, "stop"), ("stop", "stop"), ("length", "length"),
                                               ("content_filter", "content_filter"), ("weird", "stop")])
def test_the_finish_reason_is_upstreams_when_a_client_can_use_it(upstream, expected):
    progress = k2proxy.Progress(None, show_reasoning=True)
    progress.events(k2proxy.Delta("", "text", finish_reason=upstream))
    assert progress.closing(prompt_tokens=1)[-1].reason == expected


def test_usage_is_upstreams_where_given_else_estimated():
    progress = k2proxy.Progress(None, show_reasoning=True)
    usage = {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46}
    progress.events(k2proxy.Delta("r" * 40, "a" * 40, usage=usage))
    assert progress.closing(prompt_tokens=99)[-1].usage == Usage(12, 34, 10)
    partial = k2proxy.Progress(None, show_reasoning=True)
    partial.events(k2proxy.Delta("", "a" * 40, usage={"total_tokens": "many"}))
    assert partial.closing(prompt_tokens=7)[-1].usage == Usage(7, 10, 0)


# ─── pull: an upstream kind's events to a writer, a restart only while nothing was seen ───

class Recorder:
    """A writer that keeps what it was given, one list per write; committed once told so."""

    def __init__(self, committed=False):
        self.writes = []
        self.closed = None
        self.committed = committed
        self.resets = 0

    async def write(self, events):
        self.writes.append(events)

    async def close(self, events):
        self.closed = events
        return "response"

    def reset(self):
        self.resets += 1
        self.writes = []


def core(tools=None, show_reasoning=True):
    return k2proxy.CoreRequest("m", "m", (k2proxy.Turn("user", ({"type": "text", "text": "abcd" * 10},)),), {},
                               "medium", True, show_reasoning, tools)


def record():
    return k2proxy.RequestRecord("POST", "/v1/chat/completions", "openai", True, time.monotonic())


async def upstream(*items):
    for item in items:
        yield item


FINISH = Finish("stop", Usage(10, 2, 1))


async def test_what_arrived_together_leaves_in_one_write_and_the_finish_closes():
    writer, facts = Recorder(), record()
    reply = await k2proxy.pull(upstream(k2proxy.Attempt(1, 0), [Reasoning("why"), Text("because")], [FINISH]),
                               writer, facts)
    assert reply == "response" and writer.writes == [[Reasoning("why"), Text("because")]]
    assert writer.closed == [FINISH] and facts.first_content >= 0 and facts.usage == FINISH.usage
    assert (facts.attempts, facts.token_index) == (1, 0)


async def test_a_restart_voids_a_failed_attempt_the_client_has_not_seen():
    writer, facts = Recorder(), record()
    error = k2proxy.UpstreamError(k2proxy.BROKEN, "cut")
    await k2proxy.pull(upstream(k2proxy.Attempt(1, 0), [Text("lost")], k2proxy.Restart(error),
                                k2proxy.Attempt(2, 1), [Text("kept")], [FINISH]), writer, facts)
    assert writer.resets == 1 and writer.writes == [[Text("kept")]] and (facts.attempts, facts.token_index) == (2, 1)


async def test_a_restart_after_the_client_saw_content_ends_with_its_error():
    error = k2proxy.UpstreamError(k2proxy.BROKEN, "cut")
    with pytest.raises(k2proxy.UpstreamError) as raised:
        await k2proxy.pull(upstream([Text("seen")], k2proxy.Restart(error), [Text("never")]),
                           Recorder(committed=True), record())
    assert raised.value is error


def test_progress_closes_with_the_estimated_usage():
    progress = k2proxy.Progress(None, show_reasoning=True)
    progress.events(k2proxy.Delta("why", "because"))
    assert progress.closing(prompt_tokens=10) == [FINISH]


async def test_the_collector_gathers_an_answer_and_raises_a_failure():
    rendered = []
    collector = k2proxy.Collector(lambda answer: rendered.append(answer) or {"ok": True}, limit=1000)
    await collector.write([Reasoning("r1"), Text("a"), ToolCallStart(0, "id0", "search"), ToolArguments(0, "{}"),
                           Reasoning("r2"), Text("b")])
    response = await collector.close([Finish("tool_calls", Usage(1, 2, 0))])
    answer = rendered[0]
    assert (answer.reasoning, answer.text) == ("r1r2", "ab")
    assert answer.calls == [k2proxy.AnsweredCall("id0", "search", "{}")]
    assert answer.finish.reason == "tool_calls" and json.loads(response.body) == {"ok": True}
    error = k2proxy.ApiError(504, "slow")
    with pytest.raises(k2proxy.ApiError):
        await k2proxy.Collector(dict, limit=1000).close([Failed(error)])


# ─── The OpenAI renderer of events ───────────────────────────────────────────

def chunks(data):
    return [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]


def test_openai_chunks_keep_reasoning_and_content_apart_and_end_with_done():
    renderer = k2proxy.ChatChunks(core(), think_tags=False, include_usage=True)
    sent = chunks(renderer.render([Reasoning("r"), Text("a")]))
    deltas = [json.loads(c)["choices"][0]["delta"] for c in sent]
    assert deltas == [{"role": "assistant", "reasoning_content": "r"}, {"content": "a"}]
    ending = chunks(renderer.render([Finish("stop", Usage(1, 2, 0, 1))]))
    assert json.loads(ending[0])["choices"][0]["finish_reason"] == "stop"
    assert json.loads(ending[1])["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                                              "prompt_tokens_details": {"cached_tokens": 1},
                                              "completion_tokens_details": {"reasoning_tokens": 0}}
    assert ending[2] == "[DONE]"


def test_openai_think_tags_close_before_the_answer_and_at_the_end():
    renderer = k2proxy.ChatChunks(core(), think_tags=True, include_usage=False)
    first = [json.loads(c)["choices"][0]["delta"] for c in chunks(renderer.render([Reasoning("r"), Text("a")]))]
    assert first == [{"role": "assistant", "content": "<think>r</think>\n\na"}]
    renderer = k2proxy.ChatChunks(core(), think_tags=True, include_usage=False)
    renderer.render([Reasoning("only")])
    last = chunks(renderer.render([Finish("stop", Usage(1, 1, 1))]))
    assert json.loads(last[0])["choices"][0]["delta"] == {"content": "</think>"}


def test_openai_failure_after_the_start_is_an_error_event():
    renderer = k2proxy.ChatChunks(core(), think_tags=False, include_usage=False)
    sent = chunks(renderer.render([Failed(k2proxy.ApiError(504, "slow", code="upstream_timeout"))]))
    assert json.loads(sent[0])["error"] == {"message": "slow", "type": "timeout_error", "param": None,
                                            "code": "upstream_timeout"}
    assert sent[1] == "[DONE]"


# ─── Failure kinds and their policy ──────────────────────────────────────────

ANSWERS = [  # (status, body, Retry-After) → (kind, client status, code, charged, fails over)
    ((401, '{"detail": "expired"}', None), (k2proxy.REFUSED_TOKEN, 502, "upstream_auth_failed", True, True)),
    ((403, "no", None), (k2proxy.REFUSED_TOKEN, 502, "upstream_auth_failed", True, True)),
    ((429, "", "30"), (k2proxy.RATE_LIMITED, 429, "rate_limited", False, True)),
    ((500, "boom", None), (k2proxy.BROKEN, 502, "upstream_error", True, True)),
    ((503, "", None), (k2proxy.BROKEN, 502, "upstream_error", True, True)),
    ((400, '{"detail": "Model not found"}', None), (k2proxy.MODEL_GONE, 404, "model_not_found", False, False)),
    ((400, '{"detail": "bad"}', None), (k2proxy.REJECTED, 400, "upstream_rejected", False, False)),
    ((422, "", None), (k2proxy.REJECTED, 400, "upstream_rejected", False, False)),
    ((413, "", None), (k2proxy.TOO_LARGE, 413, "upstream_rejected", False, False)),
    ((302, "", None), (k2proxy.NOT_AN_ANSWER, 502, "upstream_error", False, False)),
    ((404, "", None), (k2proxy.NOT_AN_ANSWER, 502, "upstream_error", False, False)),
]


@pytest.mark.parametrize("answer,policy", ANSWERS, ids=[f"{a[0]}-{p[0].name}" for a, p in ANSWERS])
def test_each_upstream_answer_is_a_kind_with_its_policy(answer, policy):
    status, body, retry_after = answer
    error = k2proxy.site_error(status, k2proxy.error_detail(body), retry_after)
    kind, status, code, charged, fails_over = policy
    assert error.failure is kind
    assert (kind.status, kind.code, kind.charge, kind.fail_over) == (status, code, charged, fails_over)
    shown = error.api_error()
    assert (shown.status, shown.code) == (status, code) and str(answer[0]) in shown.message


def test_the_kinds_made_elsewhere_carry_their_policy():
    table = {k2proxy.UNREACHABLE: (502, False, False), k2proxy.TIMED_OUT: (504, True, True),
             k2proxy.NO_CONTENT: (502, True, True), k2proxy.BLOCKED: (502, False, True),
             k2proxy.SHUTTING_DOWN: (503, False, False)}
    for kind, (status, charged, fails_over) in table.items():
        assert (kind.status, kind.charge, kind.fail_over) == (status, charged, fails_over), kind.name
    assert k2proxy.no_content_error("application/json", {"status", "task_id"}).failure is k2proxy.NO_CONTENT
    assert k2proxy.blocked_error(403, "<title>Just a moment...</title>").failure is k2proxy.BLOCKED


def pool(clock):
    settings = k2proxy.load_settings({"MAX_TOKEN_FAILURES": "2"})
    tokens = k2proxy.CredentialPool("user", "/nonexistent/tokens.txt", settings, clock=lambda: clock[0])
    tokens.load("first\nsecond\n")
    return tokens


@pytest.mark.parametrize("kind,charged,disabled_as", [
    (k2proxy.REFUSED_TOKEN, 1, "auth"), (k2proxy.BROKEN, 1, "failures"),
    (k2proxy.TIMED_OUT, 1, "failures"), (k2proxy.NO_CONTENT, 1, "failures"),
    (k2proxy.BLOCKED, 0, None), (k2proxy.UNREACHABLE, 0, None),
    (k2proxy.REJECTED, 0, None)])
def test_a_charged_kind_counts_against_the_token_and_disables_it_at_the_limit(kind, charged, disabled_as):
    tokens = pool([1000.0])
    token = tokens.credentials[0]
    tokens.succeed(tokens.credentials[1])  # another token works: the failures are this one's
    for _ in range(2):
        tokens.fail(token, k2proxy.UpstreamError(kind, "x"))
    assert token.failures == 2 * charged and token.disabled == disabled_as and token.last_error == "x"


def test_a_rate_limit_rests_the_token_without_charging_it():
    clock = [1000.0]
    tokens = pool(clock)
    token = tokens.credentials[0]
    tokens.fail(token, k2proxy.UpstreamError(k2proxy.RATE_LIMITED, "slow down", retry_after=30))
    assert token.failures == 0 and token.cooling_until == 1030.0 and tokens.state(token, 1010.0) == "cooling"
    tokens.fail(token, k2proxy.UpstreamError(k2proxy.RATE_LIMITED, "slow down"))
    assert token.cooling_until == 1000.0 + k2proxy.RATE_LIMIT_REST


def test_a_refused_account_token_asks_its_account_to_sign_in_again():
    tokens = pool([1000.0])
    tokens.put_account_token("ann@example.com", "jwt", None)
    account_token = tokens.credentials[-1]
    tokens.fail(tokens.credentials[0], k2proxy.UpstreamError(k2proxy.REFUSED_TOKEN, "no"))
    assert tokens.refused_accounts() == []
    tokens.fail(account_token, k2proxy.UpstreamError(k2proxy.REFUSED_TOKEN, "no"))
    assert tokens.refused_accounts() == ["ann@example.com"]
    tokens.put_account_token("ann@example.com", "fresh", None)
    assert tokens.refused_accounts() == []


@pytest.mark.parametrize("kind", [k2proxy.BROKEN, k2proxy.TIMED_OUT, k2proxy.NO_CONTENT])
def test_a_failure_that_may_be_upstreams_is_not_charged_while_no_other_token_works(kind):
    tokens = pool([1000.0])
    for _ in range(5):
        for token in tokens.credentials:
            error = k2proxy.UpstreamError(kind, "x")
            assert tokens.fail(token, error) is error, "returned, to charge if another token answers the request"
    assert [token.failures for token in tokens.credentials] == [0, 0] and tokens.ready() is None
    assert tokens.failing_everywhere()
    tokens.succeed(tokens.credentials[1])
    assert not tokens.failing_everywhere()
    assert tokens.fail(tokens.credentials[0], k2proxy.UpstreamError(kind, "x")) is None
    assert tokens.credentials[0].failures == 1, "charged once another token is seen working"


def test_a_pool_is_ready_again_once_its_tokens_cooldown_is_over():
    clock = [1000.0]
    tokens = pool(clock)
    for token in tokens.credentials:
        for _ in range(2):
            tokens.charge(token, k2proxy.UpstreamError(k2proxy.BROKEN, "x"))
    assert tokens.ready().code == "no_usable_tokens"
    clock[0] += k2proxy.load_settings({}).token_cooldown
    assert tokens.ready() is None, "a request would be served now, so /health says ok"


def test_the_anonymous_identity_is_never_charged_and_cannot_change():
    tokens = pool([1000.0])
    tokens.fail(k2proxy.NO_CREDENTIAL, k2proxy.UpstreamError(k2proxy.BROKEN, "x"))
    tokens.succeed(k2proxy.NO_CREDENTIAL)
    with pytest.raises(AttributeError):
        k2proxy.NO_CREDENTIAL.value = "stolen"


@pytest.mark.parametrize("kind", [k2proxy.REFUSED_TOKEN, k2proxy.RATE_LIMITED, k2proxy.BROKEN, k2proxy.UNREACHABLE,
                                  k2proxy.TIMED_OUT, k2proxy.NO_CONTENT, k2proxy.BLOCKED, k2proxy.REJECTED,
                                  k2proxy.MODEL_GONE, k2proxy.NOT_AN_ANSWER, k2proxy.SHUTTING_DOWN],
                         ids=lambda kind: kind.name)
def test_another_try_follows_the_kind_and_one_identity_does_not_ask_twice_after_a_timeout_or_a_429(kind):
    token = pool([0.0]).credentials[0]
    assert k2proxy.worth_another_try(kind, token) == kind.fail_over
    anonymous_again = kind.fail_over and kind not in (k2proxy.TIMED_OUT, k2proxy.RATE_LIMITED)
    assert k2proxy.worth_another_try(kind, k2proxy.NO_CREDENTIAL) == anonymous_again


# ─── A stream always ends in its dialect's way, whatever fails once it started ───

@DIALECTS
async def test_any_failure_after_a_stream_started_ends_it_with_the_dialects_error(proxy, fake, monkeypatch, caplog,
                                                                                 path):
    real_read = k2proxy.SiteReader.read

    def read_then_break(reader, frames):  # a bug anywhere, once text has reached the client
        delta = real_read(reader, frames)
        if getattr(reader, "text_seen", False):
            raise RuntimeError("a bug in the proxy")
        reader.text_seen = bool(delta.text)
        return delta

    monkeypatch.setattr(k2proxy.SiteReader, "read", read_then_break)
    fake.reply = Reply(answer="word " * 100, piece=5, delay=0.002)
    response = await asyncio.wait_for(proxy.post(path, json=asked(path, stream=True), headers=AUTH), 10)
    raw = (await asyncio.wait_for(response.read(), 10)).decode()
    assert response.status == 200 and "word" in raw
    assert ends_with_error(path, raw) in ("internal_error", "api_error")
    assert "a bug in the proxy" not in raw and "Traceback" not in raw
    assert "internal error in a completion" in caplog.text
