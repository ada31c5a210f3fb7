"""The 2026 site (K2 Horizon at chat.ifm.ai): the payload it takes, its history rule, reasoning effort, how its
stream ends, the retired model ids, and answers that hold no text."""

import json
import time

import pytest
from conftest import AUTH, MODEL, ROOT, chat, effort_sent, post_chat, read_sse, stream_text
from fake_site import Reply, make_jwt

import k2proxy

REASONING = "The user greets me.\nI greet back."
ANSWER = "Hello — 你好! How can I help?"
TOKENS = [make_jwt(time.time() + 3600, "first"), make_jwt(time.time() + 3600, "second")]


async def test_an_answer_that_ends_with_a_torn_down_connection_is_complete(proxy, fake):
    """The site sends a finish chunk and a done event, then drops the connection: that is a normal end."""
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER)
    assert fake.reply.task_id and fake.reply.ragged and fake.reply.markup == "details_plain"
    events, _ = await read_sse(await post_chat(proxy, chat(stream=True)))
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert stream_text(events[:-1], "reasoning_content") == REASONING and stream_text(events[:-1]) == ANSWER
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    body = await (await post_chat(proxy, chat())).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_the_fake_site_enforces_its_rules(fake, aiohttp_client):
    """What makes a regression of the payload fail the suite: the fake refuses what the real site refuses."""
    client = await aiohttp_client(fake.app)
    base = {"stream": True, "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    cases = [({**base, "model": "MBZUAI-IFM/K2-Think"}, 400, {"detail": "Model not found"}),
             ({**base, "chat_id": "a", "id": "b", "session_id": "c"}, 200, "task_id"),
             ({**base, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                    {"role": "user", "content": "c"}]}, 400, "thinking field"),
             ({**base, "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400,
              "only first"),
             ({**base, "extra_body": {"chat_template_kwargs": {"reasoning_effort": "max"}}}, 400, "max")]
    for payload, status, expected in cases:
        response = await client.post("/api/guest/chat/completions", json=payload)
        body = await response.json()
        assert response.status == status
        assert body == expected if isinstance(expected, dict) else expected in json.dumps(body)


@pytest.mark.parametrize("reply,code,words", [
    (Reply(body='{"status": true, "task_id": "5f7c"}'), "upstream_no_content", "task_id"),
    (Reply(status=403, content_type="text/html", body="<html><head><title>Just a moment...</title></head></html>"),
     "upstream_blocked", "Just a moment..."),
    (Reply(reasoning="", answer="", markup="plain"), "upstream_no_content", "without any text"),
], ids=["task-id-document", "html-403", "empty-stream"])
@pytest.mark.parametrize("stream", [True, False])
async def test_an_answer_without_text_is_a_502_never_an_empty_200(make_proxy, fake, reply, code, words, stream):
    proxy = await make_proxy(MAX_RETRIES=0)
    fake.reply = reply
    response = await post_chat(proxy, chat(stream=stream))
    error = (await response.json())["error"]
    assert response.status == 502 and error["code"] == code and words in error["message"]


@pytest.mark.parametrize("bad", [Reply(body='{"status": true, "task_id": "5f7c"}'),
                                 Reply(status=403, content_type="text/html", body="<title>Blocked</title>"),
                                 Reply(reasoning="", answer="", markup="plain")],
                         ids=["task-id-document", "html-403", "empty-stream"])
async def test_an_answer_without_text_fails_over_to_the_next_token(make_proxy, fake, tmp_path, caplog, bad):
    caplog.set_level("INFO", logger="k2proxy")
    (tmp_path / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    proxy = await make_proxy(PROXY_MODE="user")
    fake.by_token[TOKENS[0]] = bad
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER)
    body = await (await post_chat(proxy, chat())).json()
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert [r.token for r in fake.received] == TOKENS
    failed = [r.getMessage() for r in caplog.records if "upstream attempt" in r.getMessage()]
    assert len(failed) == 1 and ("upstream_blocked" if bad.status == 403 else "upstream_no_content") in failed[0]


@pytest.mark.parametrize("env,extra,model,expected", [
    ({}, {}, MODEL, "high"),
    ({"REASONING_EFFORT": "medium"}, {}, MODEL, "medium"),
    ({"REASONING_EFFORT": "low"}, {}, MODEL, "low"),
    ({}, {"reasoning_effort": "high"}, MODEL, "high"),
    ({}, {"reasoning_effort": "medium"}, MODEL, "medium"),
    ({}, {"reasoning_effort": "low"}, MODEL, "low"),
    ({}, {"reasoning_effort": "minimal"}, MODEL, "low"),
    ({}, {"reasoning_effort": "none"}, MODEL, "low"),
    ({}, {"reasoning_effort": "xhigh"}, MODEL, "high"),
    ({"REASONING_EFFORT": "high"}, {}, MODEL + "-nothink", "low"),
])
async def test_reasoning_effort_reaches_upstream(make_proxy, fake, env, extra, model, expected):
    proxy = await make_proxy(**env)
    assert (await post_chat(proxy, chat(model=model, **extra))).status == 200
    assert effort_sent(fake) == expected


@pytest.mark.parametrize("value", ["max", "HIGH", 3, ["low"], {"effort": "low"}, True])
async def test_an_unknown_reasoning_effort_is_a_400_naming_the_allowed_values(proxy, fake, value):
    response = await post_chat(proxy, chat(reasoning_effort=value))
    error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == "reasoning_effort"
    assert "none, minimal, low, medium, high, xhigh" in error["message"] and fake.received == []


async def test_a_conversation_of_several_turns_is_accepted_by_the_site(proxy, fake):
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "They greet me."},
                {"role": "user", "content": "How are you?"}]
    response = await post_chat(proxy, {"model": MODEL, "messages": messages})
    assert response.status == 200
    sent = fake.received[0].body["messages"]
    assert sent[1] == {"role": "assistant", "content": "Hello!", "reasoning": ""}
    assert "They greet me." not in json.dumps(sent)


async def test_tool_history_is_accepted_by_the_site(proxy, fake):
    tool = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}}}
    messages = [{"role": "user", "content": "Time?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    response = await post_chat(proxy, {"model": MODEL, "messages": messages, "tools": [tool]})
    assert response.status == 200
    assistant = fake.received[0].body["messages"][2]
    assert assistant["role"] == "assistant" and assistant["reasoning"] == "" and "clock" in assistant["content"]


@pytest.mark.parametrize("asked", ["MBZUAI-IFM/K2-Think", "MBZUAI-IFM/K2-Think-v2", "MBZUAI-IFM/K2-Think-nothink",
                                   "MBZUAI-IFM/K2-Think-v2-nothink"])
async def test_retired_model_ids_are_served_by_the_current_model(proxy, fake, asked):
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER)
    body = await (await post_chat(proxy, chat(model=asked))).json()
    assert body["model"] == asked and body["choices"][0]["message"]["content"] == ANSWER
    assert ("reasoning_content" in body["choices"][0]["message"]) == (not asked.endswith("-nothink"))
    assert fake.received[-1].body["model"] == MODEL
    listed = [m["id"] for m in (await (await proxy.get("/v1/models", headers=AUTH)).json())["data"]]
    assert listed == [MODEL, MODEL + "-nothink", "k2-horizon-375b-a23b", "k2-horizon-375b-a23b-nothink"]


async def test_aliases_still_add_names(make_proxy, fake):
    proxy = await make_proxy(MODEL_ALIASES=f"k2={MODEL}")
    body = await (await post_chat(proxy, chat(model="k2-nothink"))).json()
    assert body["model"] == "k2-nothink" and fake.received[-1].body["model"] == MODEL


def test_no_upstream_host_is_written_into_the_code_but_the_default():
    source = (ROOT / "k2proxy.py").read_text(encoding="utf-8")
    assert source.count("chat.ifm.ai") == 1 and "k2think.ai" not in source
    assert k2proxy.load_settings({}).k2think_base_url == "https://chat.ifm.ai"
