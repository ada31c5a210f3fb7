"""End to end: the official openai SDK's Responses API against `python k2proxy.py` in front of the fake upstream,
as processes."""

import base64
import json

import openai
import pytest
from conftest import MODEL, openai_sdk

REASONING = "The user greets me.\nA short greeting fits."
ANSWER = "Hello from K2 Horizon — 你好!"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.fixture
def running(pair):
    started = pair()
    return openai_sdk(started), started


def test_create_with_a_string_items_and_instructions(running):
    client, started = running
    started.steer(reasoning=REASONING, answer=ANSWER)
    plain = client.responses.create(model=MODEL, input="Hello")
    assert plain.output_text == ANSWER and plain.status == "completed" and plain.id.startswith("resp_")
    items = client.responses.create(model=MODEL, instructions="Answer briefly.", input=[
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}])
    assert items.output_text == ANSWER and items.usage.total_tokens == 46
    sent = started.received()[-1]["body"]["messages"]
    assert sent == [{"role": "system", "content": "Answer briefly.\n\nBe kind."}, {"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("summary", [None, "auto"])
def test_the_stream_and_its_reasoning_summary(running, summary):
    client, started = running
    started.steer(reasoning=REASONING, answer=ANSWER, piece=4, delay=0.002)
    extra = {"reasoning": {"summary": summary}} if summary else {}
    with client.responses.stream(model=MODEL, input="Hello", **extra) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    summary_text = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert text == ANSWER and final.output_text == ANSWER
    assert summary_text == (REASONING if summary else "")
    assert [item.type for item in final.output] == (["reasoning", "message"] if summary else ["message"])


def test_stream_true_gives_the_same_events(running):
    client, started = running
    started.steer(answer=ANSWER)
    events = list(client.responses.create(model=MODEL, input="Hello", stream=True))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == ANSWER


def test_a_function_call_round_trip_with_the_whole_history(running):
    client, started = running
    started.steer(script=[{"answer": CALL}, {"answer": "It is 18 °C in Paris."}])
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER], store=False)
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    history = [{"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 18}'}]
    final = client.responses.create(model=MODEL, input=history, tools=[WEATHER], store=False)
    assert final.output_text == "It is 18 °C in Paris."
    result = started.received()[-1]["body"]["messages"][-1]["content"]
    assert f'tool_call_id="{call.call_id}"' in result and '{"celsius": 18}' in result


def test_a_function_call_round_trip_by_previous_response_id(running):
    client, started = running
    started.steer(script=[{"answer": CALL}, {"answer": "It is 18 °C in Paris."}])
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER])
    call = first.output[0]
    final = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER], input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 18}'}])
    assert final.output_text == "It is 18 °C in Paris." and final.previous_response_id == first.id
    sent = started.received()[-1]["body"]["messages"]
    assert sent[-3]["content"] == "Weather in Paris?"
    assert "get_weather" in sent[-2]["content"] and "18" in sent[-1]["content"]


def test_an_image_is_refused_saying_the_model_reads_text_only(running):
    client, started = running
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": f"data:image/png;base64,{png}"}]}])
    assert raised.value.body["param"] == "input[0].content[1]" and "text only" in raised.value.body["message"]
    assert started.received() == []


def test_retrieve_and_delete(running):
    client, started = running
    started.steer(answer=ANSWER)
    created = client.responses.create(model=MODEL, input="Hello")
    assert client.responses.retrieve(created.id).output_text == ANSWER
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_typed_sdk_exceptions(running):
    client, started = running
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input="Hello")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Hello", previous_response_id="resp_unknown")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=started.url + "/v1", api_key="sk-wrong", max_retries=0).responses.create(
            model=MODEL, input="Hello")
    assert started.received() == []
