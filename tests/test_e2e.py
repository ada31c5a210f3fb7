"""End to end: the official openai SDK against `python k2proxy.py` in front of the fake upstream, as processes."""

import json
import urllib.request

import openai
import pytest

from conftest import ROOT, free_port

MODEL = "MBZUAI-IFM/K2-Think"


@pytest.fixture
def running(spawn, tmp_path):
    """A fake upstream process and a proxy process started as a user would, from an empty directory."""
    upstream_port, proxy_port = free_port(), free_port()
    spawn([str(ROOT / "tests" / "fake_upstream.py"), "--port", str(upstream_port)], upstream_port)
    proxy = spawn([str(ROOT / "k2proxy.py")], proxy_port, cwd=tmp_path, env={
        "PORT": str(proxy_port), "HOST": "127.0.0.1", "VALID_API_KEY": "sk-e2e",
        "K2THINK_BASE_URL": f"http://127.0.0.1:{upstream_port}"})

    def steer(**reply):
        request = urllib.request.Request(f"http://127.0.0.1:{upstream_port}/_fake/reply",
                                         data=json.dumps(reply).encode(), method="POST")
        urllib.request.urlopen(request, timeout=5).read()

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{proxy_port}/v1", api_key="sk-e2e", max_retries=0)
    return client, steer, proxy


def test_openai_sdk_stream(running):
    client, steer, _ = running
    steer(reasoning="Two plus two.", answer="It is 4.", markup="details", piece=3)
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
    assert [m.id for m in client.models.list()] == [MODEL, MODEL + "-nothink"]


def test_no_set_up_start_prints_a_generated_key_once(spawn, tmp_path):
    port = free_port()
    process = spawn([str(ROOT / "k2proxy.py")], port, cwd=tmp_path, env={"PORT": str(port), "HOST": "127.0.0.1",
                                                                          "VALID_API_KEY": ""})
    warning = process.stderr.readline()
    key = process.stderr.readline().strip()
    assert "VALID_API_KEY is not set" in warning and key.startswith("sk-")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL, MODEL + "-nothink"]
    process.terminate()
    assert process.wait(10) == 0 or process.returncode < 0
    assert process.stderr.read().count(key) == 0, "the key is printed once, never logged again"
