"""Images and files in messages, sent through the openai SDK; the fake upstream records what arrived."""

import base64

import openai
import pytest
from conftest import API_KEY
from fake_site import Reply

PNG = base64.b64encode(bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                     "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()
PNG_URL = f"data:image/png;base64,{PNG}"
MODEL = "IFM/K2-Horizon-375B-A23B"
TOOLS = [{"type": "function", "function": {"name": "describe", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture
async def sdk(make_proxy):
    """The openai SDK in front of a proxy that forwards images (IMAGES=forward), for an upstream that reads them."""
    proxy = await make_proxy(IMAGES="forward")
    return openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key=API_KEY, max_retries=0)


async def test_an_image_is_refused_by_default_saying_the_model_reads_text_only(proxy, fake):
    sdk = openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        await send(sdk, user(text("What is this?"), {"type": "image_url", "image_url": {"url": PNG_URL}}))
    error = raised.value.body
    assert error["param"] == "messages[0].content[1]" and error["code"] == "images_not_supported"
    assert "text only" in error["message"] and fake.received == []


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def text(value):
    return {"type": "text", "text": value}


def file_part(name, data, media="text/plain"):
    encoded = base64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()
    return {"type": "file", "file": {"filename": name, "file_data": f"data:{media};base64,{encoded}"}}


async def send(sdk, messages, **extra):
    return await sdk.chat.completions.create(model=MODEL, messages=messages, **extra)


@pytest.mark.parametrize("with_tools", [False, True])
async def test_images_are_forwarded_as_openai_parts(sdk, fake, with_tools):
    fake.reply = Reply(answer="A one-pixel image.")
    extra = {"tools": TOOLS} if with_tools else {}
    reply = await send(sdk, user(text("What is this?"), {"type": "image_url", "image_url": {"url": PNG_URL}},
                                 {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}), **extra)
    assert reply.choices[0].message.content == "A one-pixel image."
    sent = fake.received[0].body["messages"][-1]["content"]
    assert sent == [{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": PNG_URL}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]
    assert ("describe" in fake.received[0].body["messages"][0]["content"]) == with_tools


async def test_a_tool_result_with_an_image_reaches_the_model_as_an_image(sdk, fake):
    """A screenshot tool's result is an image, not megabytes of base64 in the prompt."""
    image = {"type": "image_url", "image_url": {"url": PNG_URL}}
    call = {"id": "call_1", "type": "function", "function": {"name": "describe", "arguments": "{}"}}
    await send(sdk, [*user(text("Describe the screen")),
                     {"role": "assistant", "content": [text("Taking a look.")], "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "call_1", "content": [text("the screen:"), image]}], tools=TOOLS)
    assistant, result = fake.received[0].body["messages"][-2:]
    assert assistant["role"] == "assistant" and assistant["content"].startswith("Taking a look.\n<tool_call>")
    assert result["role"] == "user" and result["content"][1:] == [image]
    assert result["content"][0]["text"].startswith("<tool_result") and "the screen:" in result["content"][0]["text"]
    assert "base64" not in result["content"][0]["text"]


async def test_an_image_in_an_assistant_message_is_a_400(sdk, fake):
    image = {"type": "image_url", "image_url": {"url": PNG_URL}}
    with pytest.raises(openai.BadRequestError) as raised:
        await send(sdk, [*user(text("hi")), {"role": "assistant", "content": [text("look"), image]}, *user(text("?"))])
    assert raised.value.body["param"] == "messages[1].content[1]" and fake.received == []


async def test_text_file_is_inlined_with_its_name(sdk, fake):
    content = "名前,値\nÅngström,1\n```code```\n"
    await send(sdk, user(text("Summarise:"), file_part("data.csv", content)))
    sent = fake.received[0].body["messages"][-1]["content"]
    assert isinstance(sent, str)
    assert sent == f"Summarise:\nFile: data.csv\n````\n{content}\n````"


async def test_text_file_recognised_by_media_type(sdk, fake):
    await send(sdk, user(file_part("notes", '{"a": 1}', "application/json")))
    assert '{"a": 1}' in fake.received[0].body["messages"][-1]["content"]


async def test_text_only_parts_become_a_plain_string(sdk, fake):
    await send(sdk, user(text("one"), text("two")))
    assert fake.received[0].body["messages"][-1]["content"] == "one\ntwo"


@pytest.mark.parametrize("part,status,fragment", [
    (file_part("report.pdf", b"%PDF-1.7 binary\x00\x01", "application/pdf"), 400, "report.pdf"),
    (file_part("photo.bin", b"\x00\xff\xfe\x01" * 10, "application/octet-stream"), 400, "photo.bin"),
    (file_part("broken.txt", b"invalid utf-8 \xc3\x28 \xfd"), 400, "broken.txt"),
    (file_part("disguised.txt", b"%PDF-1.7\n\x00\x01 binary"), 400, "disguised.txt"),
    (file_part("big.txt", "x" * (1024 * 1024 + 10)), 413, "MAX_FILE_MB"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}, 400, "base64"),
    ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}, 400, "not an image"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,hello%20world"}}, 400, "base64"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, 400, "base64"),
    ({"type": "image_url", "image_url": {"url": "ftp://example.com/x.png"}}, 400, "http"),
    ({"type": "image_url", "image_url": {}}, 400, "url is missing"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, 400, "input_audio"),
    ({"type": "file", "file": {"file_id": "file-abc"}}, 400, "file_data"),
    ({"type": "file", "file": "nope"}, 400, "file"),
])
async def test_bad_parts_are_rejected_naming_message_and_part(make_proxy, fake, part, status, fragment):
    proxy = await make_proxy(MAX_FILE_MB="1", IMAGES="forward")
    sdk = openai.AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key=API_KEY, max_retries=0)
    messages = [{"role": "system", "content": "Be helpful."}] + user(text("look"), part)
    with pytest.raises(openai.APIStatusError) as raised:
        await send(sdk, messages)
    error = raised.value.body
    assert raised.value.status_code == status
    assert error["param"] == "messages[1].content[1]" and "messages[1].content[1]" in error["message"]
    assert fragment in error["message"]
    assert fake.received == []
