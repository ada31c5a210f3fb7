"""Chat completions through the proxy: real streaming, every upstream variant, a character cut between two frames
(in every dialect), upstream failures."""

import asyncio
import json
import logging

import pytest
from conftest import (
    API_KEY,
    AUTH,
    DIALECTS,
    asked,
    chat,
    never_reading_client,
    post_chat,
    read_sse,
    state_of,
    stream_ended_well,
    stream_text,
    stream_text_of,
    until,
)
from fake_site import Reply, old_site
from hypothesis import HealthCheck, assume, given, settings
from site_grammar import site_streams

import k2proxy

REASONING = "Let me think.\nThe user wants a greeting."
ANSWER = "Hello there — 你好!"


def counts(usage):
    """The token counts of an OpenAI usage object, without the details the proxy adds (reasoning, cached)."""
    return {name: usage[name] for name in ("prompt_tokens", "completion_tokens", "total_tokens")}


async def test_stream_framing(proxy, fake):
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER)
    response = await post_chat(proxy, chat(stream=True))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Cache-Control"] == "no-cache"
    events, _ = await read_sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "IFM/K2-Horizon-375B-A23B" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert stream_text(chunks, "reasoning_content") == REASONING
    assert stream_text(chunks) == ANSWER
    assert not any("usage" in c for c in chunks)


async def test_reasoning_and_answer_never_share_a_delta(proxy, fake):
    """Clients that read one field per delta (`reasoning or content`) must not lose the answer."""
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER, piece=1000)
    events, _ = await read_sse(await post_chat(proxy, chat(stream=True)))
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert not any("reasoning_content" in d and "content" in d for d in deltas)
    shown = "".join(d.get("reasoning_content") or d.get("content") or "" for d in deltas)
    assert shown == REASONING + ANSWER


@pytest.mark.parametrize("markup", ["details_plain", "tags", "tags_no_answer", "lone_think", "details"])
@pytest.mark.parametrize("style,form", [("snapshot", "content"), ("snapshot", "choices"), ("incremental", "choices")])
@pytest.mark.parametrize("opening", [False, True], ids=["", "empty-first-frame"])
@pytest.mark.parametrize("site", [Reply, old_site], ids=["k2horizon", "k2think"])
async def test_every_variant_streams_exact_text(proxy, fake, markup, style, form, opening, site):
    fake.reply = site(reasoning=REASONING, answer=ANSWER, markup=markup, style=style, chunk_bytes=5, form=form,
                      opening=opening)
    events, _ = await read_sse(await post_chat(proxy, chat(stream=True)))
    assert stream_text(events[:-1], "reasoning_content") == REASONING
    assert stream_text(events[:-1]) == ANSWER


async def test_incremental_pieces_that_repeat_are_not_taken_for_snapshots(proxy, fake):
    fake.reply = Reply(reasoning="ha ha ha ha, funny", answer="ok ok ok", markup="lone_think", style="incremental",
                       piece=3)
    events, _ = await read_sse(await post_chat(proxy, chat(stream=True)))
    assert stream_text(events[:-1], "reasoning_content") == "ha ha ha ha, funny"
    assert stream_text(events[:-1]) == "ok ok ok"


async def test_an_emoji_cut_between_two_frames_reaches_the_client_whole(proxy, fake):
    frames = ['{"content": "A \\ud83d"}', '{"content": "A \\ud83d\\ude00 B"}',
              '{"choices": [{"delta": {}, "finish_reason": "stop"}]}', '{"done": true}']
    fake.reply = Reply(body="".join(f"data: {frame}\n\n" for frame in frames), content_type="text/event-stream")
    events, _ = await read_sse(await proxy.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict)
                   and e.get("choices"))
    assert text == "A \U0001f600 B" and events[-1] == "[DONE]"


@DIALECTS
async def test_an_emoji_cut_between_two_pieces_arrives_whole_from_the_site(proxy, fake, path):
    frames = ['{"choices": [{"delta": {"content": "A \\ud83d"}}]}',
              '{"choices": [{"delta": {"content": "\\ude00 B"}}]}',
              '{"choices": [{"delta": {}, "finish_reason": "stop"}]}']
    fake.reply = Reply(body="".join(f"data: {frame}\n\n" for frame in frames) + "data: [DONE]\n\n",
                       content_type="text/event-stream")
    response = await asyncio.wait_for(proxy.post(path, json=asked(path, stream=True), headers=AUTH), 10)
    raw = (await asyncio.wait_for(response.read(), 10)).decode()
    assert stream_text_of(path, raw) == "A \U0001f600 B" and stream_ended_well(path, raw)


async def test_first_delta_arrives_while_upstream_still_streams(proxy, fake):
    fake.reply = Reply(reasoning="x" * 300, answer=ANSWER, piece=5, delay=0.05)
    response = await post_chat(proxy, chat(stream=True))
    async for line in response.content:
        if line.startswith(b"data: ") and b"reasoning_content" in line:
            break
    assert fake.open_streams == 1, "the first delta must not wait for the upstream to finish"
    response.close()


async def test_client_leaving_closes_the_upstream_request(proxy, fake):
    fake.reply = Reply(reasoning="x" * 1000, piece=5, delay=0.05)
    response = await post_chat(proxy, chat(stream=True))
    await response.content.readline()
    response.close()
    await asyncio.wait_for(fake.client_gone.wait(), 5)
    assert fake.open_streams == 0


async def test_nothink_hides_reasoning_and_sends_the_base_model(proxy, fake):
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER)
    events, _ = await read_sse(await post_chat(proxy, chat(model="IFM/K2-Horizon-375B-A23B-nothink", stream=True)))
    assert stream_text(events[:-1], "reasoning_content") == ""
    assert stream_text(events[:-1]) == ANSWER
    assert events[0]["model"] == "IFM/K2-Horizon-375B-A23B-nothink"
    assert fake.received[0].body["model"] == "IFM/K2-Horizon-375B-A23B"


async def test_think_tags_put_reasoning_inline(make_proxy, fake):
    proxy = await make_proxy(THINKING_FORMAT="think_tags")
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER)
    events, _ = await read_sse(await post_chat(proxy, chat(stream=True)))
    assert stream_text(events[:-1]) == f"<think>{REASONING}</think>\n\n{ANSWER}"
    body = await (await post_chat(proxy, chat())).json()
    assert body["choices"][0]["message"]["content"] == f"<think>{REASONING}</think>\n\n{ANSWER}"
    assert "reasoning_content" not in body["choices"][0]["message"]


async def test_non_stream_answer(proxy, fake):
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER, markup="details")
    response = await post_chat(proxy, chat())
    body = await response.json()
    assert response.status == 200 and body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert counts(body["usage"]) == fake.reply.usage and body["usage"]["completion_tokens_details"]["reasoning_tokens"]


@pytest.mark.parametrize("chunk_bytes", [0, 500], ids=["one-read", "many-reads"])
async def test_json_answer_to_a_stream_request(proxy, fake, chunk_bytes):
    answer = ANSWER * (1 + chunk_bytes // 10)
    fake.reply = Reply(reasoning=REASONING, answer=answer, json_answer=True, chunk_bytes=chunk_bytes)
    events, _ = await read_sse(await post_chat(proxy, chat(stream=True, stream_options={"include_usage": True})))
    assert stream_text(events[:-1], "reasoning_content") == REASONING
    assert stream_text(events[:-1]) == answer
    assert counts(events[-2]["usage"]) == fake.reply.usage


@pytest.mark.parametrize("reason", ["length", "content_filter"])
async def test_upstream_finish_reason_reaches_the_client(proxy, fake, reason):
    fake.reply = Reply(answer=ANSWER, finish_reason=reason)
    events, _ = await read_sse(await post_chat(proxy, chat(stream=True)))
    assert events[-2]["choices"][0]["finish_reason"] == reason
    body = await (await post_chat(proxy, chat())).json()
    assert body["choices"][0]["finish_reason"] == reason and body["choices"][0]["message"]["content"] == ANSWER


@pytest.mark.parametrize("alone", [True, False])
async def test_include_usage_adds_one_usage_chunk(proxy, fake, alone):
    fake.reply = Reply(usage_alone=alone)
    events, _ = await read_sse(await post_chat(proxy, chat(stream=True, stream_options={"include_usage": True})))
    usage_chunks = [e for e in events[:-1] if "usage" in e]
    assert len(usage_chunks) == 1 and usage_chunks[0] is events[-2]
    assert usage_chunks[0]["choices"] == [] and counts(usage_chunks[0]["usage"]) == fake.reply.usage


async def test_silent_upstream_gets_keepalive_comments(make_proxy, fake):
    proxy = await make_proxy(KEEPALIVE_SECONDS="0.1")
    fake.reply = Reply(first_delay=0.5)
    events, comments = await read_sse(await post_chat(proxy, chat(stream=True)))
    assert comments and all(c.startswith(":") for c in comments)
    assert stream_text(events[:-1]) == fake.reply.answer


async def test_upstream_payload_and_headers(proxy, fake):
    body = {"model": "IFM/K2-Horizon-375B-A23B", "temperature": 0.3, "top_p": 0.9, "max_tokens": 77, "stop": "END",
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                         {"role": "assistant", "content": "Hello", "reasoning_content": "secret thoughts"},
                         {"role": "user", "content": "Again"}]}
    assert (await post_chat(proxy, body)).status == 200
    received = fake.received[0]
    assert received.path == "/api/guest/chat/completions"
    sent = received.body
    assert sent == {
        "stream": True, "model": "IFM/K2-Horizon-375B-A23B",
        "params": {"temperature": 0.3, "top_p": 0.9, "max_tokens": 77, "stop": ["END"]},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello", "reasoning": ""}, {"role": "user", "content": "Again"}],
        "features": {"web_search": False}, "chat_template_kwargs": {"reasoning_effort": "high"},
        "extra_body": {"chat_template_kwargs": {"reasoning_effort": "high"}}}
    assert "secret thoughts" not in json.dumps(sent)
    headers = received.headers
    assert headers["Origin"] == fake.url and headers["Referer"] == fake.url + "/guest"
    assert headers["Accept"] == "text/event-stream, application/json" and "Mozilla" in headers["User-Agent"]
    hints = {name.lower(): value for name, value in headers.items() if name.lower().startswith("sec-ch-ua")}
    chrome = headers["User-Agent"].split("Chrome/")[1].split(".")[0]
    assert f'"Google Chrome";v="{chrome}"' in hints["sec-ch-ua"] and hints["sec-ch-ua-mobile"] == "?0"
    assert hints["sec-ch-ua-platform"] == '"Windows"' and "Windows" in headers["User-Agent"]
    assert "Authorization" not in headers


@pytest.mark.parametrize("reply,status,code", [
    (Reply(status=500, body="oops"), 502, "upstream_error"),
    (Reply(status=503, body='{"detail": "overloaded"}'), 502, "upstream_error"),
    (Reply(status=400, body='{"detail": "Model not found"}'), 404, "model_not_found"),
    (Reply(status=302, headers={"Location": "/auth"}), 502, "upstream_error"),
    (Reply(content_type="text/html"), 502, "upstream_blocked"),
])
@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_failure_before_any_byte_is_a_real_http_error(make_proxy, fake, reply, status, code, stream):
    proxy = await make_proxy(MAX_RETRIES=0)
    fake.reply = reply
    response = await post_chat(proxy, chat(stream=stream))
    assert response.status == status
    error = (await response.json())["error"]
    assert error["code"] == code and error["message"] and set(error) == {"message", "type", "param", "code"}


async def test_slow_first_byte_is_a_504_after_one_anonymous_attempt(make_proxy, fake):
    proxy = await make_proxy(REQUEST_TIMEOUT="0.3")
    fake.reply = Reply(first_delay=3)
    response = await post_chat(proxy, chat(stream=True))
    assert response.status == 504
    assert (await response.json())["error"]["code"] == "upstream_timeout"
    assert len(fake.received) == 1, "without tokens, trying again only doubles the wait"


@pytest.mark.parametrize("reply,code", [
    (Reply(reasoning="x" * 200, piece=5, drop_after=10), "upstream_error"),
    (Reply(reasoning="x" * 200, piece=5, hang_after=10), "upstream_timeout"),
    (Reply(reasoning="x" * 200, piece=5, error_after=10), "upstream_error"),
])
async def test_failure_after_content_ends_with_error_event(make_proxy, fake, reply, code):
    proxy = await make_proxy(REQUEST_TIMEOUT="0.5")
    fake.reply = reply
    response = await post_chat(proxy, chat(stream=True))
    assert response.status == 200
    events, _ = await read_sse(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == code
    assert stream_text(events[:-2], "reasoning_content").startswith("xxxx")
    assert len(fake.received) == 1, "no retry once the client has seen content"


async def test_shutdown_ends_streams_in_flight_with_their_end(proxy, fake):
    fake.reply = Reply(reasoning="x" * 1000, piece=5, delay=0.05)
    response = await post_chat(proxy, chat(stream=True))
    async for line in response.content:
        if b"reasoning_content" in line:
            break
    await proxy.server.app[k2proxy.STATE].http.stop()
    events, _ = await read_sse(response)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down"


@pytest.mark.parametrize("stream", [True, False])
async def test_shutdown_ends_requests_still_waiting_for_upstream(proxy, fake, stream):
    fake.reply = Reply(first_delay=30)
    request = asyncio.ensure_future(post_chat(proxy, chat(stream=stream)))
    await until(lambda: fake.received)
    await proxy.server.app[k2proxy.STATE].http.stop()
    response = await asyncio.wait_for(request, 5)
    assert response.status == 503 and (await response.json())["error"]["code"] == "shutting_down"


@settings(max_examples=max(10, settings.default.max_examples // 10),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stream=site_streams())
def test_any_stream_of_the_grammar_reaches_every_dialect_exactly(served, stream):
    """Generated site streams, over real HTTP through the proxy to chat, Messages and Responses clients (the
    official SDKs), streamed and not: each shows exactly the model's answer and reasoning."""
    assume(any(stream.shown))
    served.fake.reply = Reply(raw=tuple(stream.reads), ragged=stream.complete_end)
    for client in served.clients:
        assert served.run(client.ask([client.user("Hi")])) == (stream.shown[1], stream.shown[0])


# ─── a client that stops reading: back-pressure on upstream, then the stream cut at STALL_TIMEOUT ───

async def test_a_client_that_stops_reading_holds_upstream_back_and_is_cut_at_the_stall_timeout(make_proxy, fake,
                                                                                                caplog):
    caplog.set_level(logging.INFO, logger="k2proxy")
    proxy = await make_proxy(STALL_TIMEOUT="1", KEEPALIVE_SECONDS="1")
    fake.reply = Reply(reasoning="r" * 30_000_000, answer="never read", piece=10_000, style="incremental")
    writer = await never_reading_client(proxy.server.port, API_KEY)
    state = state_of(proxy)
    await until(lambda: state.monitor.in_flight == 1)
    await until(lambda: state.monitor.in_flight == 0, seconds=10)  # cut, though upstream has more to send
    assert "status=499 (client gone, client_stalled)" in caplog.text
    assert fake.sent_bytes < 20_000_000, "upstream was read no faster than the client read, not to its end"
    await until(lambda: fake.streams_cut_by_client == 1)  # and its connection closed
    writer.close()
