"""End to end: the official anthropic SDK against `python k2proxy.py` in front of the fake upstream, as processes."""

import base64
import time

import anthropic
import pytest
from conftest import E2E_KEY, MODEL
from fake_site import make_jwt

REASONING = "The user says hello.\nI answer in kind."
ANSWER = "Hello from K2 Horizon — 你好!"
HI = [{"role": "user", "content": "Hello"}]
BASH = {"name": "Bash", "description": "Run a shell command.",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}


def sdk(started, key=E2E_KEY):
    return anthropic.Anthropic(base_url=started.url, api_key=key, max_retries=0)


@pytest.fixture
def running(pair):
    started = pair()
    return sdk(started), started


def test_messages_create_with_thinking_on_and_off(running):
    client, started = running
    started.steer(reasoning=REASONING, answer=ANSWER)
    thought = client.messages.create(model="claude-sonnet-4-6", max_tokens=2000, messages=HI,
                                     thinking={"type": "enabled", "budget_tokens": 1024})
    assert [block.type for block in thought.content] == ["thinking", "text"]
    assert thought.content[0].thinking == REASONING and thought.content[0].signature
    assert thought.content[1].text == ANSWER and thought.stop_reason == "end_turn"
    assert thought.model == "claude-sonnet-4-6" and thought.usage.output_tokens == 34
    plain = client.messages.create(model="claude-sonnet-4-6", max_tokens=2000, messages=HI)
    assert [block.type for block in plain.content] == ["text"] and plain.content[0].text == ANSWER
    sent = started.received()
    assert [r["body"]["extra_body"]["chat_template_kwargs"]["reasoning_effort"] for r in sent] == ["low", "high"]
    assert all(r["body"]["model"] == MODEL for r in sent)


def test_messages_stream_then_the_final_message(running):
    client, started = running
    started.steer(reasoning=REASONING, answer=ANSWER, piece=3, delay=0.005)
    with client.messages.stream(model="claude-opus-4-8", max_tokens=500, messages=HI,
                                thinking={"type": "adaptive"}) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == ANSWER and len(texts) > 3
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == REASONING and final.content[1].text == ANSWER
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 34


def test_a_tool_round_trip(running):
    client, started = running
    started.steer(script=[{"answer": 'Checking.\n'
                                     '<tool_call>{"name": "Bash", "arguments": {"command": "date"}}</tool_call>'},
                          {"answer": "It is noon."}])
    first = client.messages.create(model="claude-opus-4-8", max_tokens=500, messages=HI, tools=[BASH])
    call = next(block for block in first.content if block.type == "tool_use")
    assert first.stop_reason == "tool_use" and call.name == "Bash" and call.input == {"command": "date"}
    assert call.id.startswith("toolu_")
    history = HI + [{"role": "assistant", "content": [block.model_dump() for block in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "12:00"}]}]
    final = client.messages.create(model="claude-opus-4-8", max_tokens=500, messages=history, tools=[BASH])
    assert final.content[0].text == "It is noon." and final.stop_reason == "end_turn"
    result = started.received()[-1]["body"]["messages"][-1]["content"]
    assert f'tool_call_id="{call.id}"' in result and "12:00" in result


def test_an_image_is_refused_saying_the_model_reads_text_only(running):
    client, started = running
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model="claude-opus-4-8", max_tokens=100, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
            {"type": "text", "text": "What is this?"}]}])
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert "text only" in raised.value.body["error"]["message"] and started.received() == []


def test_count_tokens(running):
    client, started = running
    short = client.messages.count_tokens(model="claude-opus-4-8", messages=HI)
    long = client.messages.count_tokens(model="claude-opus-4-8", messages=HI, system="Be brief. " * 400,
                                        tools=[BASH])
    assert 0 < short.input_tokens < long.input_tokens and started.received() == []


def test_typed_sdk_exceptions(pair, tmp_path):
    started = pair(MAX_REQUEST_MB="0.05")
    client = sdk(started)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude-opus-4-8", max_tokens=100, messages=HI, extra_body={"temperature": 5})
    with pytest.raises(anthropic.AuthenticationError):
        sdk(started, "sk-wrong").messages.create(model="claude-opus-4-8", max_tokens=100, messages=HI)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="gpt-4", max_tokens=100, messages=HI)
    with pytest.raises(anthropic.RequestTooLargeError):
        client.messages.create(model="claude-opus-4-8", max_tokens=100,
                               messages=[{"role": "user", "content": "x" * 100_000}])
    limited = pair(PROXY_MODE="user", MAX_RETRIES=0, tokens=[make_jwt(time.time() + 3600)])
    limited.steer(status=429, headers={"Retry-After": "30"})
    with pytest.raises(anthropic.RateLimitError) as raised:
        sdk(limited).messages.create(model="claude-opus-4-8", max_tokens=100, messages=HI)
    assert raised.value.response.headers["retry-after"]
    (tmp_path / "tokens.txt").write_text(make_jwt(time.time() - 60) + "\n")
    exhausted = pair(PROXY_MODE="user")
    with pytest.raises(anthropic.OverloadedError):
        sdk(exhausted).messages.create(model="claude-opus-4-8", max_tokens=100, messages=HI)
