"""Upstream parsing: every variant of the protocol page yields exactly the reasoning and the answer."""

import itertools

import pytest
from fake_upstream import Reply, json_document, old_site, snapshots, sse_events

import k2proxy

REASONING = "The user asks 2+2.\nThat is 4 — simple ✓.\n\n> not a quote marker"
ANSWER = "2 + 2 = **4**.\n\n```python\nprint(2 + 2)  # 四\n```"
VARIANTS = list(itertools.product(("details_plain", "tags", "tags_no_answer", "lone_think", "details"),
                                  ("snapshot", "incremental"), ("choices", "content")))
SITES = {"k2horizon": Reply, "k2think": old_site}  # each site's opening, end and close around the same text


def parse_body(body, cut):
    """Feeds an SSE body cut every `cut` bytes through the decoder and the site's reader, as the proxy reads it."""
    decoder, reader = k2proxy.SSEDecoder(), k2proxy.SiteReader()
    reasoning, answer, usage, ended = [], [], None, False
    chunks = [body[i:i + cut] for i in range(0, len(body), cut)] + [b""]
    for number, chunk in enumerate(chunks):
        delta = reader.read(decoder.feed(chunk, final=number == len(chunks) - 1))
        reasoning.append(delta.reasoning)
        answer.append(delta.text)
        usage = delta.usage or usage
        ended = ended or delta.ended
    r, a = reader.finish()
    return "".join(reasoning) + r, "".join(answer) + a, usage, ended


@pytest.mark.parametrize("markup,style,form", VARIANTS)
@pytest.mark.parametrize("cut", [1, 2, 5, 64, 100000])
@pytest.mark.parametrize("site", SITES)
def test_each_variant_gives_exact_reasoning_and_answer(markup, style, form, cut, site):
    reply = SITES[site](reasoning=REASONING, answer=ANSWER, markup=markup, style=style, form=form, piece=4,
                        garbage=True, crlf=cut == 5)
    body = "".join(sse_events(reply)).encode()
    reasoning, answer, usage, done = parse_body(body, cut)
    assert (reasoning, answer) == (REASONING, ANSWER)
    assert usage == reply.usage and done


def test_plain_text_is_all_answer():
    reasoning, answer, _, _ = parse_body("".join(sse_events(Reply(markup="plain", answer=ANSWER))).encode(), 3)
    assert (reasoning, answer) == ("", ANSWER)


@pytest.mark.parametrize("marker", ["[DONE]", "DONE", "done", "done_json"])
def test_every_end_marker_ends_the_stream(marker):
    *_, done = parse_body("".join(sse_events(Reply(end=marker))).encode(), 7)
    assert done


def test_json_answer_is_parsed_like_a_stream():
    import json
    reply = Reply(reasoning=REASONING, answer=ANSWER)
    frame = k2proxy.parse_frame(json.dumps(json_document(reply)))
    text = k2proxy.UpstreamText()
    r1, a1 = text.feed(frame.text)
    r2, a2 = text.finish()
    assert (r1 + r2, a1 + a2) == (REASONING, ANSWER)
    assert frame.usage == reply.usage


def test_details_rewrite_emits_no_markup_twice():
    reply = Reply(reasoning="one\ntwo", answer="three", markup="details", piece=3)
    text = k2proxy.UpstreamText()
    pieces = [text.feed(snapshot) for snapshot in snapshots(reply)]
    pieces.append(text.finish())
    joined = "".join(r + a for r, a in pieces)
    assert joined == "one\ntwothree"
    assert "<" not in joined and ">" not in joined


@pytest.mark.parametrize("payload,expected", [
    ("-1", None), ("", None), ("{not json", None), ("12", None),
    ('{"detail": "Model not found"}', k2proxy.Frame(error="Model not found")),
    ('{"error": {"message": "boom"}}', k2proxy.Frame(error="boom")),
    ('{"done": true}', k2proxy.Frame(done=True)),
    ('{"content": "hi", "usage": {"total_tokens": 3}}', k2proxy.Frame(text="hi", usage={"total_tokens": 3})),
])
def test_payloads(payload, expected):
    assert k2proxy.parse_frame(payload) == expected


def test_sse_comments_and_fields_are_skipped():
    decoder = k2proxy.SSEDecoder()
    frames = decoder.feed(b': ping\nevent: message\nid: 3\nretry: 10\ndata: {"content": "x"}\n\n')
    assert [f.text for f in frames] == ["x"]


def test_utf8_cut_inside_a_character():
    data = 'data: {"content": "四五"}\n\n'.encode()
    decoder = k2proxy.SSEDecoder()
    frames = [f for i in range(len(data)) for f in decoder.feed(data[i:i + 1])]
    assert [f.text for f in frames] == ["四五"]


def test_frame_cut_inside_tags():
    text = k2proxy.UpstreamText()
    out = [text.feed(piece) for piece in ("<thi", "nk>why</th", "ink><ans", "wer>be", "cause</ans", "wer>")]
    out.append(text.finish())
    assert ("".join(r for r, _ in out), "".join(a for _, a in out)) == ("why", "because")


def test_reasoning_streams_before_the_answer_is_known():
    text = k2proxy.UpstreamText()
    assert text.feed("<think>first thoughts") == ("first thoughts", "")
    assert text.feed("<think>first thoughts and more") == (" and more", "")


def test_snapshot_parsing_work_grows_linearly():
    """A 2x longer answer in snapshots costs about 2x the parser's steps, not 4x."""
    def steps(length):
        reply = Reply(reasoning="r" * length, answer="a" * length, piece=50, markup="details")
        calls = 0
        original = k2proxy.MarkupSplitter.feed

        def counting(self, chunk):
            nonlocal calls
            calls += len(chunk)
            return original(self, chunk)
        k2proxy.MarkupSplitter.feed = counting
        try:
            text = k2proxy.UpstreamText()
            for snapshot in snapshots(reply):
                text.feed(snapshot)
        finally:
            k2proxy.MarkupSplitter.feed = original
        return calls
    assert steps(20000) <= 2.2 * steps(10000)


def feed_all(frames):
    text = k2proxy.UpstreamText()
    out = [text.feed(frame) for frame in frames] + [text.finish()]
    return "".join(r for r, _ in out), "".join(a for _, a in out)


@pytest.mark.parametrize("frames,expected", [
    (["", "<think>", "why", "</think>", "ok"], ("why", "ok")),                        # empty opening frame
    (["\n", "\n", "hm", "</think>", "ok"], ("hm", "ok")),                              # repeated first piece
    (["ha", "ha", "ha", "</think>", "ok"], ("hahaha", "ok")),
    (["<think>a", "<think>a", "<think>ab</think>ok"], ("ab", "ok")),                   # repeated first snapshot
    (["<think>a", "<think>a"], ("a", "")),                                            # only repeats: snapshots
])
def test_repeated_and_empty_first_frames(frames, expected):
    assert feed_all(frames) == expected


@pytest.mark.parametrize("piece", [5, 1000])
def test_a_repeated_first_snapshot_before_the_rewrite_of_the_reasoning_tag(piece):
    frames = snapshots(Reply(reasoning="The user asks.", answer="Fine.", markup="details", piece=piece))
    assert feed_all([frames[0], *frames]) == ("The user asks.", "Fine.")


@pytest.mark.parametrize("frames,expected", [
    ([("Hi", False), (" you", False), ("Hi you", True)], ("", "Hi you")),              # pieces, then the whole
    ([("Hi", False), ("Hi you", False), ("Hi you", True)], ("", "Hi you")),            # snapshots, then the whole
    ([("Hi", False), ("Hi", False), ("Hi", True)], ("", "Hi")),                        # a repeat, settled by done
    ([("Hi", False), ("Hi you, and more", True)], ("", "Hi you, and more")),           # the last words only in done
    ([("<think>a", False), ("<think>ab</think>ok", True)], ("ab", "ok")),
])
def test_the_done_event_holds_the_whole_answer_which_is_not_doubled(frames, expected):
    text = k2proxy.UpstreamText()
    out = [text.read(k2proxy.Frame(text=value, done=done)) for value, done in frames] + [text.finish()]
    assert ("".join(r for r, _ in out), "".join(a for _, a in out)) == expected


def test_answer_after_details_streams_at_once():
    """The 2026 site writes the answer bare after </details>: it is not held back until the end."""
    frames = snapshots(Reply(reasoning="Think.", answer="The answer grows word by word.", piece=5))
    text = k2proxy.UpstreamText()
    shown = [text.feed(frame)[1] for frame in frames]
    answer_frames = [a for a in shown if a]
    assert len(answer_frames) > 3 and "".join(shown) == "The answer grows word by word."
