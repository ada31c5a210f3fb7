"""The 2026 rules of the site (K2 Horizon at chat.ifm.ai), each through every client dialect it reaches, whole and
streamed, with the official openai and anthropic SDKs: text only, effort and where it goes, follow-ups filed as
reasoning, the stream's choices frames and done snapshot, browser client hints, history, the model's context, and
--check's effort-field probe."""

import asyncio
import json
import re
import time
from dataclasses import replace

import anthropic
import openai
import pytest
from conftest import (
    AUTH,
    CLIENTS,
    EACH_DIALECT,
    IMAGE,
    IMAGE_PARTS,
    MODEL,
    NO_REASONING_SHOWN,
    TEXT_PARTS,
    WHOLE_OR_STREAMED,
    chat,
    read_sse,
    run_check,
)
from fake_model import EMPTY_PROMPT_REPLY
from fake_site import EFFORT_FROM, Reply, frame_payloads, make_jwt, old_site

import k2proxy

REASONING = "The user greets me.\nI greet back — 你好."
ANSWER = "Hello! How can I help you today?"
TOKEN = make_jwt(time.time() + 3600, "acc-2026")
CLOSERS = ["<ifm|think>", "<ifm|think_fast>", "<ifm|think_faster>", "</ifm|think>", "</ifm|think_fast>",
           "</ifm|think_faster>"]


EFFORT_OPTIONS = {  # (dialect, effort) → what the client asks for that effort, reasoning still shown
    ("chat", "low"): {"reasoning_effort": "low"}, ("chat", "medium"): {"reasoning_effort": "medium"},
    ("chat", "high"): {"reasoning_effort": "high"},
    ("anthropic", "low"): {"thinking": {"type": "enabled", "budget_tokens": 1024}},
    ("anthropic", "medium"): {"thinking": {"type": "enabled", "budget_tokens": 8000}},
    ("anthropic", "high"): {"thinking": {"type": "enabled", "budget_tokens": 20000}},
    ("responses", "low"): {"reasoning": {"effort": "low", "summary": "auto"}},
    ("responses", "medium"): {"reasoning": {"effort": "medium", "summary": "auto"}},
    ("responses", "high"): {"reasoning": {"effort": "high", "summary": "auto"}},
}


@pytest.fixture
async def connect(make_proxy, fake):
    """(dialect, stream, settings) → a client of a proxy in front of the fake, answering REASONING and ANSWER."""
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER)
    made = []

    async def start(kind, stream, **env):
        proxy = await make_proxy(**env)
        made.append(CLIENTS[kind](str(proxy.make_url("")).rstrip("/"), stream))
        return made[-1]

    yield start
    for client in made:
        await client.sdk.close()


def sent_messages(fake, index=-1):
    return fake.received[index].body["messages"]


def error_of(kind, raised):
    """(status, message, code) of the SDK's error, checked to be in the dialect's shape (Anthropic's has no code)."""
    body = raised.value.body
    if kind == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        return raised.value.status_code, body["error"]["message"], None
    assert body["type"] == "invalid_request_error"  # the openai SDK unwraps "error"
    return raised.value.status_code, body["message"], body["code"]


def bad_request(kind):
    return anthropic.BadRequestError if kind == "anthropic" else openai.BadRequestError


# ─── 1. text only

@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_text_parts_go_upstream_as_one_string_which_a_blanking_template_still_reads(connect, fake, kind,
                                                                                         stream):
    fake.blanking = True
    client = await connect(kind, stream)
    assert await client.ask([client.user(TEXT_PARTS[kind])]) == (ANSWER, REASONING)
    assert sent_messages(fake) == [{"role": "user", "content": "First line.\nSecond line."}]
    assert fake.received[-1].prompt == sent_messages(fake), "the template blanked nothing"


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_an_image_is_a_400_saying_the_model_reads_text_only_before_any_upstream_call(connect, fake, kind,
                                                                                          stream):
    client = await connect(kind, stream)
    with pytest.raises(bad_request(kind)) as raised:
        await client.ask([client.user([TEXT_PARTS[kind][0], IMAGE_PARTS[kind]])])
    status, message, code = error_of(kind, raised)
    assert status == 400 and "text only" in message and "image" in message
    assert code == (None if kind == "anthropic" else "images_not_supported")
    assert fake.received == []


@EACH_DIALECT
async def test_images_forward_sends_the_image_which_a_blanking_template_turns_into_an_empty_prompt(connect, fake,
                                                                                                 kind):
    """IMAGES=forward is for an upstream that reads images; this site's template blanks the list, as the user sees."""
    fake.blanking = True
    client = await connect(kind, False, IMAGES="forward")
    answer, _ = await client.ask([client.user([TEXT_PARTS[kind][0], IMAGE_PARTS[kind]])])
    assert sent_messages(fake) == [{"role": "user", "content": [{"type": "text", "text": "First line."},
                                                                {"type": "image_url", "image_url": {"url": IMAGE}}]}]
    assert fake.received[-1].prompt == [{"role": "user", "content": ""}]
    assert answer == EMPTY_PROMPT_REPLY["answer"]


# ─── 2. effort: in both fields, clamped to low, medium, high

EFFORTS = [
    ("chat", {}, {}, "high"), ("chat", {"REASONING_EFFORT": "medium"}, {}, "medium"),
    ("chat", {"REASONING_EFFORT": "low"}, {}, "low"),
    ("chat", {}, {"reasoning_effort": "none"}, "low"), ("chat", {}, {"reasoning_effort": "minimal"}, "low"),
    ("chat", {}, {"reasoning_effort": "low"}, "low"), ("chat", {}, {"reasoning_effort": "medium"}, "medium"),
    ("chat", {}, {"reasoning_effort": "high"}, "high"), ("chat", {}, {"reasoning_effort": "xhigh"}, "high"),
    ("anthropic", {}, {"thinking": None}, "high"), ("anthropic", {"REASONING_EFFORT": "medium"}, {"thinking": None},
                                                    "medium"),
    ("anthropic", {}, {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
    ("anthropic", {}, {"thinking": {"type": "enabled", "budget_tokens": 8000}}, "medium"),
    ("anthropic", {}, {"thinking": {"type": "enabled", "budget_tokens": 16000}}, "high"),
    ("anthropic", {}, {"thinking": {"type": "enabled", "budget_tokens": 64000}}, "high"),
    ("anthropic", {}, {"thinking": {"type": "adaptive"}}, "high"),
    ("anthropic", {}, {"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, "low"),
    ("anthropic", {}, {"thinking": {"type": "adaptive"}, "output_config": {"effort": "medium"}}, "medium"),
    ("anthropic", {}, {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}}, "high"),
    ("anthropic", {}, {"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, "high"),
    ("responses", {}, {"reasoning": None}, "high"), ("responses", {"REASONING_EFFORT": "low"}, {"reasoning": None},
                                                     "low"),
    ("responses", {}, {"reasoning": {"effort": "none"}}, "low"),
    ("responses", {}, {"reasoning": {"effort": "minimal", "summary": "auto"}}, "low"),
    ("responses", {}, {"reasoning": {"effort": "low"}}, "low"),
    ("responses", {}, {"reasoning": {"effort": "medium"}}, "medium"),
    ("responses", {}, {"reasoning": {"effort": "high"}}, "high"),
    ("responses", {}, {"reasoning": {"effort": "xhigh"}}, "high"),
]


@pytest.mark.parametrize("kind,env,asked,effort", EFFORTS)
async def test_effort_goes_in_both_fields_clamped_to_what_the_template_knows(connect, fake, kind, env, asked, effort):
    client = await connect(kind, False, **env)
    answer, _ = await client.ask([client.user("Hi")], **asked)
    assert answer == ANSWER
    body = fake.received[-1].body
    assert body["chat_template_kwargs"] == {"reasoning_effort": effort}
    assert body["extra_body"] == {"chat_template_kwargs": {"reasoning_effort": effort}}
    assert fake.received[-1].effort == effort


@EACH_DIALECT
@pytest.mark.parametrize("effort_from", ["extra_body", "chat_template_kwargs", "both"])
async def test_the_effort_asked_is_the_one_acted_on_wherever_the_template_reads_it(connect, fake, kind, effort_from):
    fake.effort_from = effort_from
    client = await connect(kind, False)
    answer, _ = await client.ask([client.user("Hi")], **EFFORT_OPTIONS[kind, "medium"])
    assert answer == ANSWER and fake.received[-1].effort == "medium"


# ─── 3. a follow-up the site files wholly as reasoning, answered after its effort closer

def history_with_a_turn(client):
    return [client.user("Hi"), *client.turn(ANSWER, REASONING), client.user("And how are you?")]


@EACH_DIALECT
@WHOLE_OR_STREAMED
@pytest.mark.parametrize("closer", CLOSERS)
@pytest.mark.parametrize("piece,delay", [(4, 0), (1, 0.002)], ids=["back-to-back", "paced-by-character"])
async def test_a_follow_up_filed_as_reasoning_is_answered_after_its_closer(connect, fake, kind, stream, closer,
                                                                           piece, delay):
    """Small frames cut the closer anywhere (paced: a read ends at each cut); the user sees no closer anywhere."""
    fake.empty_followups = True
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER, closer=closer, piece=piece, delay=delay)
    client = await connect(kind, stream)
    said = await client.ask(history_with_a_turn(client), **EFFORT_OPTIONS[kind, "low"])
    assert fake.received[-1].effort == "low"
    assert said == (ANSWER, REASONING)


@WHOLE_OR_STREAMED
@pytest.mark.parametrize("effort", ["low", "medium", "high"])
async def test_a_follow_up_at_each_effort_shows_the_same_answer(connect, fake, stream, effort):
    """At high the site answers after </details>; at low and medium all in the reasoning: the user cannot tell."""
    fake.empty_followups = True
    client = await connect("chat", stream)
    said = await client.ask(history_with_a_turn(client), reasoning_effort=effort)
    assert said == (ANSWER, REASONING) and fake.received[-1].effort == effort


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_a_nothink_follow_up_thinks_low_and_still_shows_its_answer(connect, fake, kind, stream):
    fake.empty_followups = True
    client = await connect(kind, stream, REASONING_EFFORT="high")
    said = await client.ask(history_with_a_turn(client), model=MODEL + "-nothink", **NO_REASONING_SHOWN[kind])
    assert said == (ANSWER, "") and fake.received[-1].effort == "low"


@pytest.mark.parametrize("closer", CLOSERS)
def test_the_closer_is_found_wherever_pieces_cut_it_and_each_search_covers_only_the_new_piece(monkeypatch, closer):
    """The work per piece does not grow with the reasoning so far: each search sees the piece and a held tail."""
    searched, pattern = [], k2proxy.EFFORT_CLOSER

    class Recording:
        def search(self, text, *args):
            searched.append(len(text))
            return pattern.search(text, *args)

    monkeypatch.setattr(k2proxy, "EFFORT_CLOSER", Recording())
    reasoning = "Weigh <a> against <ifm|thin, and <ifm|think_f too. " * 400
    longest = max(map(len, CLOSERS))
    for size in (1, 3, 7, 64):
        text, splitter, shown, answer = reasoning + closer + "\n\n" + ANSWER, k2proxy.CloserSplitter(), [], []
        searched.clear()
        for start in range(0, len(text), size):
            more_reasoning, more_answer = splitter.feed(text[start:start + size])
            shown.append(more_reasoning)
            answer.append(more_answer)
        shown.append(splitter.finish())
        assert ("".join(shown), "".join(answer)) == (reasoning, ANSWER)
        assert max(searched) < size + longest


# ─── 4. the stream: each Open WebUI configuration, the done event's snapshot, older markup

ESCAPABLE = "The user asks: is 2 < 3 & 'x' \"quoted\"?\nYes — a > b, &amp; stays &amp;."
CONFIGURATIONS = {  # shared/k2think-protocol.md, "Where the frames come from"
    "default": {}, "realtime save": {"realtime_save": True}, "batched deltas": {"batch": 3},
    "escaped reasoning": {"escaped": True}, "realtime save, escaped": {"realtime_save": True, "escaped": True},
    "status, title, sources, model id": {"extras": True}, "responses events": {"responses": True},
    "done without content": {"done_content": False}, "older site's pieces": {"style": "incremental"},
}


@EACH_DIALECT
@WHOLE_OR_STREAMED
@pytest.mark.parametrize("configuration", CONFIGURATIONS)
async def test_each_open_webui_configuration_gives_the_exact_answer(connect, fake, kind, stream, configuration):
    """Text in either form, or both in one stream, reaches every client whole: never cut, doubled or marked up."""
    fake.reply = Reply(reasoning=ESCAPABLE, answer=ANSWER, piece=5, **CONFIGURATIONS[configuration])
    client = await connect(kind, stream)
    assert await client.ask([client.user("Hi")]) == (ANSWER, ESCAPABLE)


async def test_with_realtime_save_the_answer_reaches_the_client_piece_by_piece(connect, fake):
    """The answer's pieces are forwarded as they come: the first ones are shown while upstream is still open."""
    words = "One two three four five six seven eight nine ten."
    reply = Reply(reasoning=REASONING, answer=words, realtime_save=True, piece=4)
    answer_pieces = [n for n, payload in enumerate(frame_payloads(reply)) if '"delta": {"content"' in payload]
    third_piece = answer_pieces[2]
    fake.reply = replace(reply, hang_after=third_piece + 1)
    client = await connect("chat", True)
    shown = ""
    async with asyncio.timeout(10):
        async for chunk in await client.sdk.chat.completions.create(model=MODEL, messages=[client.user("Hi")],
                                                                    stream=True):
            shown += "".join(choice.delta.content or "" for choice in chunk.choices)
            if len(shown) >= 12:
                break
    assert shown == words[:12] and fake.open_streams == 1, "upstream has not ended: the pieces came as they came"


TAIL = " Ask me anything — 随时."


@EACH_DIALECT
@WHOLE_OR_STREAMED
@pytest.mark.parametrize("delay", [0, 0.01], ids=["back-to-back", "paced"])
async def test_the_done_events_snapshot_brings_the_tail_of_the_answer(connect, fake, kind, stream, delay):
    """The site's last snapshot rides in the done event after the finish chunk; paced, they come in separate reads."""
    fake.reply = Reply(reasoning=REASONING, answer=ANSWER, done_tail=TAIL, delay=delay)
    client = await connect(kind, stream)
    assert await client.ask([client.user("Hi")]) == (ANSWER + TAIL, REASONING)


MARKUPS = [Reply(markup="think_duration"), old_site(markup="think_duration"), Reply(markup="lone_think"),
           old_site(markup="lone_think")]


@EACH_DIALECT
@WHOLE_OR_STREAMED
@pytest.mark.parametrize("reply", MARKUPS, ids=["duration-snapshots", "duration-chunks", "lone-snapshots",
                                                "lone-chunks"])
async def test_think_with_a_duration_and_a_lone_closing_think_are_still_read(connect, fake, kind, stream, reply):
    fake.reply = Reply(**{**reply.__dict__, "reasoning": REASONING, "answer": ANSWER})
    client = await connect(kind, stream)
    assert await client.ask([client.user("Hi")]) == (ANSWER, REASONING)


# ─── 5. browser headers

PLATFORMS = {"Windows NT": '"Windows"', "Macintosh": '"macOS"', "X11; Linux": '"Linux"'}


@EACH_DIALECT
@pytest.mark.parametrize("mode", ["guest", "user"])
async def test_each_request_carries_chromes_client_hints_matching_its_user_agent(connect, fake, tmp_path, kind,
                                                                                mode):
    (tmp_path / "tokens.txt").write_text(TOKEN + "\n")
    client = await connect(kind, False, PROXY_MODE=mode)
    assert (await client.ask([client.user("Hi")]))[0] == ANSWER
    headers = fake.received[-1].headers
    agent = headers["User-Agent"]
    chrome = re.search(r"Chrome/(\d+)\.", agent).group(1)
    hints = {name.lower(): value for name, value in headers.items() if name.lower().startswith("sec-ch-ua")}
    assert set(hints) == {"sec-ch-ua", "sec-ch-ua-mobile", "sec-ch-ua-platform"}
    assert f'"Google Chrome";v="{chrome}"' in hints["sec-ch-ua"] and f'"Chromium";v="{chrome}"' in hints["sec-ch-ua"]
    assert hints["sec-ch-ua-mobile"] == "?0" and "Mobile" not in agent
    assert [platform for system, platform in PLATFORMS.items() if system in agent] == [hints["sec-ch-ua-platform"]]
    assert headers["Accept"] == "text/event-stream, application/json" and headers["Origin"] == fake.url


# ─── 6. history: every earlier assistant turn with reasoning "", never null

HISTORIES = {
    "chat": [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!", "reasoning_content": REASONING},
             {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Plain."},
             {"role": "user", "content": "Still?"},
             {"role": "assistant", "content": "Nulls.", "reasoning_content": None, "reasoning": None},
             {"role": "user", "content": "Thanks"}],
    "anthropic": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": [{"type": "thinking", "thinking": REASONING, "signature": "s"},
                                                    {"type": "text", "text": "Hello!"}]},
                  {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Plain."},
                  {"role": "user", "content": "Still?"},
                  {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xyz"},
                                                    {"type": "text", "text": "Nulls."}]},
                  {"role": "user", "content": "Thanks"}],
    "responses": [{"role": "user", "content": "Hi"},
                  {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": REASONING}]},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More?"},
                  {"role": "assistant", "content": "Plain."}, {"role": "user", "content": "Still?"},
                  {"type": "reasoning", "id": "rs_2", "summary": []},
                  {"role": "assistant", "content": "Nulls."}, {"role": "user", "content": "Thanks"}],
}


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_earlier_assistant_turns_go_with_an_empty_string_reasoning_never_null(connect, fake, kind, stream):
    client = await connect(kind, stream)
    assert await client.ask(HISTORIES[kind]) == (ANSWER, REASONING)
    sent = sent_messages(fake)
    assert [m for m in sent if m["role"] == "assistant"] == [
        {"role": "assistant", "content": text, "reasoning": ""} for text in ("Hello!", "Plain.", "Nulls.")]
    assert REASONING not in json.dumps(sent, ensure_ascii=False)


# ─── 7. the model: 512K context, -nothink

async def test_the_model_cards_carry_the_512k_context(proxy):
    assert k2proxy.CONTEXT_TOKENS == 512 * 1024
    cards = (await (await proxy.get("/v1/models", headers=AUTH)).json())["data"]
    assert cards and all(card["context_length"] == 512 * 1024 for card in cards)
    for card in cards:
        one = await (await proxy.get(f"/v1/models/{card['id']}", headers=AUTH)).json()
        assert one["context_length"] == 512 * 1024


@EACH_DIALECT
@WHOLE_OR_STREAMED
async def test_a_prompt_beyond_the_context_is_a_400_before_any_upstream_call(connect, fake, kind, stream):
    client = await connect(kind, stream)
    with pytest.raises(bad_request(kind)) as raised:
        await client.ask([client.user("word " * (k2proxy.CONTEXT_TOKENS * 4 // 5 + 200))])
    status, message, code = error_of(kind, raised)
    assert status == 400 and str(k2proxy.CONTEXT_TOKENS) in message and "too long" in message
    assert code == (None if kind == "anthropic" else "context_length_exceeded")
    assert fake.received == []


async def test_a_prompt_within_the_context_goes_upstream(proxy, fake):
    response = await proxy.post("/v1/chat/completions", headers=AUTH,
                                json=chat("word " * (k2proxy.CONTEXT_TOKENS * 4 // 5 - 2000)))
    assert response.status == 200 and len(fake.received) == 1


@EACH_DIALECT
async def test_a_nothink_model_asks_for_low_effort(connect, fake, kind):
    client = await connect(kind, False, REASONING_EFFORT="high")
    said = await client.ask([client.user("Hi")], model=MODEL + "-nothink", **NO_REASONING_SHOWN[kind])
    assert said == (ANSWER, "") and fake.received[-1].effort == "low"
    assert fake.received[-1].body["chat_template_kwargs"] == {"reasoning_effort": "low"}


# ─── 8. --check: which effort field the site's template reads

@pytest.fixture
def check(proxy_settings, fake, tmp_path):
    """Runs the check against the fake with these settings; the report, as JSON."""
    async def run(**env):
        (tmp_path / "tokens.txt").write_text(TOKEN + "\n")
        settings = proxy_settings(ACCOUNTS_FILE=tmp_path / "accounts.txt", **env)
        return await run_check(settings)
    return run


PROBED = {"extra_body": ("ok", ["extra_body"], "reads the effort from extra_body.chat_template_kwargs"),
          "chat_template_kwargs": ("ok", ["chat_template_kwargs"],
                                   "reads the effort from the top-level chat_template_kwargs"),
          "both": ("ok", ["chat_template_kwargs", "extra_body"],
                   "reads the effort from the top-level chat_template_kwargs and extra_body.chat_template_kwargs"),
          "neither": ("skipped", [], "cannot tell")}


@pytest.mark.parametrize("effort_from", EFFORT_FROM)
@pytest.mark.parametrize("mode", ["guest", "user"])
async def test_the_effort_field_probe_names_the_field_the_template_reads(check, fake, effort_from, mode):
    fake.effort_from = effort_from
    report = await check(PROXY_MODE=mode)
    probe = next(p for p in report["probes"] if p["name"] == "effort field")
    verdict, read, words = PROBED[effort_from]
    assert (probe["verdict"], probe["details"], report["works"]) == (verdict, {"read": read}, True)
    assert words in probe["summary"]
    asked = [r for r in fake.received if "k2proxy-check" in json.dumps(r.body)]
    fields = [("chat_template_kwargs" if r.body["chat_template_kwargs"]["reasoning_effort"] == "k2proxy-check"
               else "extra_body") for r in asked]
    assert fields == ["chat_template_kwargs", "extra_body"], "one field at a time"
    assert all(r.token == (TOKEN if mode == "user" else "") for r in asked)


# ─── the fake itself: each variant it can produce

async def fake_events(client, body):
    """The JSON payloads of the fake's answer to `body` (steered to end cleanly, to be read whole)."""
    response = await client.post("/api/guest/chat/completions", json=body)
    assert response.status == 200
    events, _ = await read_sse(response)
    return [e for e in events if isinstance(e, dict)]


async def test_the_fake_site_produces_each_2026_variant(fake, aiohttp_client):
    """Each Open WebUI configuration, a done tail, the empty follow-up, blanking and each effort field, as tests
    need."""
    client = await aiohttp_client(fake.app)
    base = {"stream": True, "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

    async def frames(**reply):
        fake.reply = Reply(**{"reasoning": REASONING, "answer": ANSWER, "ragged": False, **reply})
        events = await fake_events(client, base)
        whole = [e["content"] for e in events if "content" in e and "done" not in e]
        pieces = [e["choices"][0]["delta"].get("content") for e in events if e.get("choices")]
        return events, whole, [piece for piece in pieces if piece]

    events, whole, pieces = await frames(done_tail=TAIL)
    assert not pieces and whole[-1].endswith(ANSWER) and TAIL not in json.dumps(whole, ensure_ascii=False)
    assert events[-1]["content"].endswith(ANSWER + TAIL) and whole[0].endswith("\n</details>")
    assert 'done="false"' in whole[0] and 'done="true"' in whole[-1], "the reasoning tag is rewritten"
    events, whole, pieces = await frames(realtime_save=True)
    assert all(text.endswith("</details>") for text in whole) and "".join(pieces) == ANSWER
    events, whole, _ = await frames(batch=3)
    assert 0 < len(whole) < len((await frames())[1]) / 2 and not whole[-1].endswith(ANSWER)
    assert events[-1]["content"].endswith(ANSWER)
    _, whole, _ = await frames(escaped=True, reasoning="a < b & 'c'")
    assert "&gt; a &lt; b &amp; &#x27;c&#x27;" in whole[-1]
    events, whole, pieces = await frames(responses=True)
    assert not whole and not pieces and "content" not in events[-1]
    assert "".join(e["delta"] for e in events if e.get("type") == "response.output_text.delta") == ANSWER
    assert events[-1]["output"][1]["content"][0]["text"] == ANSWER
    events, _, _ = await frames(extras=True)
    assert {"action", "selected_model_id", "sources"} <= {key for e in events for key in e}
    assert (await frames(done_content=False))[0][-1] == {"done": True}

    fake.empty_followups, fake.reply = True, Reply(reasoning=REASONING, answer=ANSWER, ragged=False)
    follow_up = {**base, "chat_template_kwargs": {"reasoning_effort": "low"},
                 "extra_body": {"chat_template_kwargs": {"reasoning_effort": "low"}},
                 "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning": ""},
                              {"role": "user", "content": "c"}]}
    events = await fake_events(client, follow_up)
    final = events[-1]["content"]
    assert final.endswith("<ifm|think>\n> \n> " + ANSWER + "\n</details>")
    assert [e["content"] for e in events if "content" in e and "done" not in e][-1] == final

    fake.blanking, fake.empty_followups = True, False
    listed = {**base, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    events = await fake_events(client, listed)
    assert EMPTY_PROMPT_REPLY["answer"] in events[-1]["content"] and fake.received[-1].prompt[0]["content"] == ""

    for effort_from in EFFORT_FROM:
        fake.effort_from = effort_from
        statuses = []
        for place in ("chat_template_kwargs", "extra_body"):
            body = {**base, place: {"reasoning_effort": "max"} if place == "chat_template_kwargs" else
                    {"chat_template_kwargs": {"reasoning_effort": "max"}}}
            response = await client.post("/api/guest/chat/completions", json=body)
            statuses.append(response.status)
            if response.status == 400:
                assert await response.json() == {"detail": "Unknown reasoning_effort: max"}
            else:
                await response.read()
        assert statuses == {"extra_body": [200, 400], "chat_template_kwargs": [400, 200], "both": [400, 400],
                            "neither": [200, 200]}[effort_from]
