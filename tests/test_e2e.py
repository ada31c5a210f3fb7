"""End to end: the official openai SDK against `python k2proxy.py` in front of the fake upstream, as processes."""

import time

import openai
import pytest
from conftest import MODEL, ROOT, free_port, openai_sdk
from fake_site import make_jwt

SHORT = "k2-horizon-375b-a23b"  # the model's slash-free id


@pytest.fixture
def running(pair):
    """A fake upstream process and a proxy process started as a user would, from an empty directory."""
    started = pair()
    return openai_sdk(started), started.steer, started.process


def test_openai_sdk_stream(running):
    client, steer, _ = running
    steer(reasoning="Two plus two.", answer="It is 4.", markup="details", piece=3, site="k2think")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "2+2?"}],
                                            stream=True, stream_options={"include_usage": True})
    content, reasoning, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            finish = choice.finish_reason or finish
    assert "".join(content) == "It is 4."
    assert "".join(reasoning) == "Two plus two."
    assert finish == "stop" and usage.total_tokens == 46


def test_openai_sdk_non_stream(running):
    client, steer, _ = running
    steer(reasoning="Thinking.", answer="Done — 完成.")
    completion = client.chat.completions.create(model=MODEL + "-nothink",
                                                messages=[{"role": "user", "content": "go"}])
    message = completion.choices[0].message
    assert message.content == "Done — 完成."
    assert "reasoning_content" not in (message.model_extra or {})
    assert completion.model == MODEL + "-nothink" and completion.usage.total_tokens == 46


def test_openai_sdk_sees_typed_errors(running):
    client, steer, _ = running
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    steer(status=500, body="boom")
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_models_listed_by_the_sdk(running):
    client, _, _ = running
    assert [m.id for m in client.models.list()] == [MODEL, MODEL + "-nothink", SHORT, SHORT + "-nothink"]


def test_no_set_up_start_prints_a_generated_key_once(spawn, tmp_path):
    port = free_port()
    process = spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path, env={"PORT": str(port), "HOST": "127.0.0.1",
                                                                          "VALID_API_KEY": ""})
    warning = process.stderr.readline()
    key = process.stderr.readline().strip()
    assert "VALID_API_KEY is not set" in warning and key.startswith("sk-")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL, MODEL + "-nothink", SHORT, SHORT + "-nothink"]
    process.terminate()
    assert process.wait(10) == 0 or process.returncode < 0
    assert process.stderr.read().count(key) == 0, "the key is printed once, never logged again"


# ─── The 2026 site, end to end ───────────────────────────────────────────────

REASONING = "The user asks for 2+2.\nThat is 4."
ANSWER = "2 + 2 = **4** — 四."
USER = [{"role": "user", "content": "2+2?"}]


def streamed(client, **request):
    """(reasoning, content, finish reason, chunks) of a streamed completion, as the SDK hands them over."""
    reasoning, content, finish, chunks = [], [], None, []
    for chunk in client.chat.completions.create(stream=True, **request):
        chunks.append(chunk)
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(reasoning), "".join(content), finish, chunks


def test_the_new_site_streams_and_answers_through_the_sdk(pair):
    started = pair()
    started.steer(reasoning=REASONING, answer=ANSWER, piece=4)
    client = openai_sdk(started)
    reasoning, content, finish, chunks = streamed(client, model=MODEL, messages=USER)
    assert (reasoning, content, finish) == (REASONING, ANSWER, "stop")
    assert not any((chunk.model_extra or {}).get("error") for chunk in chunks), "no error despite the ragged close"
    message = client.chat.completions.create(model=MODEL, messages=USER).choices[0]
    assert (message.message.content, message.message.model_extra["reasoning_content"], message.finish_reason) == (
        ANSWER, REASONING, "stop")
    sent = started.received()
    assert all(r["body"]["model"] == MODEL and "chat_id" not in r["body"] for r in sent) and len(sent) == 2


@pytest.mark.parametrize("asked", ["MBZUAI-IFM/K2-Think", "MBZUAI-IFM/K2-Think-v2-nothink"])
def test_old_model_ids_answer_and_upstream_sees_the_current_one(pair, asked):
    started = pair()
    started.steer(reasoning=REASONING, answer=ANSWER)
    completion = openai_sdk(started).chat.completions.create(model=asked, messages=USER)
    assert completion.model == asked and completion.choices[0].message.content == ANSWER
    assert started.received()[-1]["body"]["model"] == MODEL


def test_a_conversation_and_a_tool_round_trip_pass_the_sites_history_rule(pair):
    started = pair()
    client = openai_sdk(started)
    started.steer(answer="I am well.")
    three_turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "How are you?"}]
    assert client.chat.completions.create(model=MODEL, messages=three_turns).choices[0].message.content == "I am well."
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]
    started.steer(script=[{"answer": '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call>'},
                          {"answer": "The sum is 4."}])
    first = client.chat.completions.create(model=MODEL, messages=USER, tools=tools).choices[0].message
    call = first.tool_calls[0]
    history = USER + [first.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "4"}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=tools)
    assert final.choices[0].message.content == "The sum is 4."
    assistants = [m for r in started.received() for m in r["body"]["messages"] if m["role"] == "assistant"]
    assert len(assistants) == 2 and all(m["reasoning"] == "" for m in assistants)


def test_reasoning_effort_reaches_upstream_and_a_bad_one_is_a_400(pair):
    started = pair(REASONING_EFFORT="high")
    client = openai_sdk(started)
    client.chat.completions.create(model=MODEL, messages=USER)
    client.chat.completions.create(model=MODEL, messages=USER, reasoning_effort="low")
    client.chat.completions.create(model=MODEL, messages=USER, reasoning_effort="minimal")
    efforts = [r["body"]["extra_body"]["chat_template_kwargs"]["reasoning_effort"] for r in started.received()]
    assert efforts == ["high", "low", "low"]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=USER, reasoning_effort="extreme")
    assert "minimal, low, medium, high" in str(error.value)


ANSWERS_WITHOUT_TEXT = {
    "task-id-document": ({"body": '{"status": true, "task_id": "7a1e"}'}, "upstream_no_content"),
    "html-403": ({"status": 403, "content_type": "text/html", "body": "<title>Attention Required!</title>"},
                 "upstream_blocked"),
    "empty-stream": ({"reasoning": "", "answer": "", "markup": "plain"}, "upstream_no_content"),
}


@pytest.mark.parametrize("case", ANSWERS_WITHOUT_TEXT)
def test_an_answer_without_text_is_a_502_with_its_code_and_fails_over(pair, case):
    bad, code = ANSWERS_WITHOUT_TEXT[case]
    tokens = [make_jwt(time.time() + 3600, name) for name in ("first", "second")]
    started = pair(PROXY_MODE="user", MAX_RETRIES=0, tokens=tokens)
    started.steer(**bad)
    client = openai_sdk(started)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as error:
            client.chat.completions.create(model=MODEL, messages=USER, stream=stream)
        assert error.value.status_code == 502 and error.value.body["code"] == code
    failover = pair(PROXY_MODE="user", tokens=tokens)
    failover.steer(token=tokens[0], **bad)
    failover.steer(answer=ANSWER)
    assert openai_sdk(failover).chat.completions.create(model=MODEL, messages=USER).choices[0].message.content == ANSWER
    assert [r["token"] for r in failover.received()] == tokens
