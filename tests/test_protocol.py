"""Upstream parsing: every variant of the protocol page yields exactly the reasoning and the answer, in work that
grows linearly and with what waits for a closer kept small."""

import hashlib
import json
import tracemalloc
from dataclasses import replace
from unittest import mock

import pytest
from fake_site import Reply, details_snapshot, json_document, old_site, quoted, snapshots, sse_events
from hypothesis import given
from hypothesis import strategies as st
from site_grammar import site_streams

import k2proxy

WHOLE, PIECE = k2proxy.TextForm.WHOLE, k2proxy.TextForm.PIECE

REASONING = "The user asks 2+2.\nThat is 4 — simple ✓ & <fine>, isn't it? \"Yes\".\n\nnot a > quote marker"
ANSWER = "2 + 2 = **4**.\n\n```python\nprint(2 + 2)  # 四\n```"
FORMS = (("snapshot", "content"), ("snapshot", "choices"), ("incremental", "choices"))  # pieces come as choices
VARIANTS = [(markup, style, form) for markup in ("details_plain", "tags", "tags_no_answer", "lone_think", "details")
            for style, form in FORMS]
SITES = {"k2horizon": Reply, "k2think": old_site}  # each site's opening, end and close around the same text


def parse_body(body, cut):
    """Feeds an SSE body cut every `cut` bytes through the decoder and the site's reader, as the proxy reads it."""
    return parse_reads([body[i:i + cut] for i in range(0, len(body), cut)])


def parse_reads(reads):
    """Feeds network reads through the decoder and the site's reader, as the proxy does, to the answer's end."""
    decoder, reader = k2proxy.SSEDecoder(k2proxy.parse_frame), k2proxy.SiteReader()
    reasoning, answer, usage, ended = [], [], None, False
    chunks = [*reads, b""]
    for number, chunk in enumerate(chunks):
        delta = reader.read(decoder.feed(chunk, final=number == len(chunks) - 1))
        reasoning.append(delta.reasoning)
        answer.append(delta.text)
        usage = delta.usage or usage
        ended = ended or delta.ended
        if ended:
            break
    r, a = reader.finish()
    return "".join(reasoning) + r, "".join(answer) + a, usage, ended


@given(stream=site_streams())
def test_any_stream_of_the_grammar_is_read_exactly(stream):
    """Every form, configuration, markup, noise, end and cut of shared/k2think-protocol.md: exactly the model's
    reasoning and answer, the usage sent, and the end seen."""
    reasoning, answer, usage, ended = parse_reads(stream.reads)
    assert (reasoning, answer) == (stream.reasoning, stream.answer)
    assert (usage, ended) == (stream.usage, stream.ended)


@given(stream=site_streams(), reach=st.integers(0, 64))
def test_any_stream_of_the_grammar_is_read_exactly_however_little_of_it_is_kept(stream, reach):
    """The text read is forgotten but for what lies within MARK_REACH of its end: however short that reach, every
    stream of the grammar still gives exactly the model's reasoning and answer."""
    with mock.patch.object(k2proxy, "MARK_REACH", reach):
        reasoning, answer, usage, ended = parse_reads(stream.reads)
    assert (reasoning, answer) == (stream.reasoning, stream.answer)
    assert (usage, ended) == (stream.usage, stream.ended)


LONG_LINES = 8000  # of the reasoning and of the answer: 0.8 MB each
SNAPSHOT_LINES = 600  # of the reasoning while it streams in whole snapshots (each frame repeats all of it)


def numbered_lines(count, name):
    return [f"{name} line {number}: " + "x" * 80 for number in range(count)]


def long_answer_frames(shape):
    """(reasoning lines, answer lines, the frames' payloads made one at a time) of a long answer in one of the 2026
    site's shapes: pieces of the whole message; the realtime save's snapshots of the reasoning block, then pieces
    of the answer; the older site's snapshots of <think> markup in choices form."""
    answer = numbered_lines(LONG_LINES, "answer")
    if shape == "pieces":
        reasoning = numbered_lines(LONG_LINES, "reasoning")
        head = '<details type="reasoning" done="true" duration="2">\n<summary>Thought for 2 seconds</summary>\n'
        pieces = [head, *(quoted(line) + "\n" for line in reasoning), "</details>\n",
                  *(line + "\n" for line in answer)]
        payloads = ({"choices": [{"delta": {"content": piece}}]} for piece in pieces)
    elif shape == "realtime save":
        reasoning = numbered_lines(SNAPSHOT_LINES, "reasoning")
        thinking = ({"content": details_snapshot("\n".join(reasoning[:shown]), 10 ** 9, "", 0)}
                    for shown in range(1, SNAPSHOT_LINES + 1))
        payloads = (*thinking, *({"choices": [{"delta": {"content": "\n" + line}}]} for line in answer))
    else:
        reasoning = numbered_lines(SNAPSHOT_LINES, "reasoning")
        whole = "<think>" + "\n".join(reasoning) + "</think>\n<answer>"
        steps = [whole[:end] for end in range(0, len(whole), len(whole) // SNAPSHOT_LINES)][1:]
        payloads = ({"choices": [{"delta": {"content": text}}]} for text in (*steps, whole))
        payloads = (*payloads, *({"choices": [{"delta": {"content": "\n" + line}}]} for line in answer))
    return reasoning, answer, payloads


def bytes_held(work):
    """The memory that Python objects allocated by `work()` still take when it returns."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape", ["pieces", "realtime save", "snapshots"])
def test_a_long_answer_is_read_without_keeping_what_was_read(shape):
    """Issue 38: a stream kept every character it read for its whole life (three times over: the markup, the
    reasoning, the answer), so slow clients could hold memory without bound. Of 1.6 MB read it now keeps about
    MARK_REACH, and still gives exactly the model's text."""
    reasoning, answer, payloads = long_answer_frames(shape)
    reader, digests, sizes = k2proxy.SiteReader(), [hashlib.sha256(), hashlib.sha256()], [0, 0]

    def shown(texts):
        for index, text in enumerate(texts):
            digests[index].update(text.encode())
            sizes[index] += len(text)

    def read_all():
        for payload in payloads:
            delta = reader.read([k2proxy.parse_frame(json.dumps(payload))])
            shown((delta.reasoning, delta.text))
    held = bytes_held(read_all)
    shown(reader.finish())
    expected = ["\n".join(reasoning), "".join(line + "\n" for line in answer).strip()]
    if shape != "pieces":
        expected[1] = "\n".join(answer)
    assert sizes == [len(text) for text in expected], "the exact text"
    assert [digest.digest() for digest in digests] == [hashlib.sha256(text.encode()).digest() for text in expected]
    assert held < 4 * k2proxy.MARK_REACH, f"{held:,} bytes held after reading {sum(sizes):,} characters"


def test_responses_style_deltas_after_a_snapshot_are_not_kept_either():
    """Deltas grow a side without the markup: a reasoning line end of the snapshot before them is no reason to keep
    what they add."""
    reader = k2proxy.SiteReader()
    reader.read([k2proxy.Frame(text=THINKING.replace("> Wh", "> a\n> b"), form=WHOLE)])

    def read_all():
        for number in range(LONG_LINES):
            reader.read([k2proxy.Frame(text=f"{number:05} " + "y" * 94, form=k2proxy.TextForm.ANSWER)])
    held = bytes_held(read_all)
    assert held < 4 * k2proxy.MARK_REACH, f"{held:,} bytes held after {LONG_LINES * 100:,} characters of deltas"


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
    ('{"content": "hi", "usage": {"total_tokens": 3}}',
     k2proxy.Frame(text="hi", form=WHOLE, usage={"total_tokens": 3})),
    ('{"choices": [{"delta": {"content": "hi"}, "finish_reason": null}]}', k2proxy.Frame(text="hi", form=PIECE)),
    ('{"choices": [{"delta": {}, "finish_reason": "stop"}]}', k2proxy.Frame(finish_reason="stop")),
    ('{"done": true, "content": "all"}', k2proxy.Frame(text="all", form=WHOLE, done=True)),
    ('{"type": "response.output_text.delta", "delta": "a"}', k2proxy.Frame(text="a", form=k2proxy.TextForm.ANSWER)),
    ('{"type": "response.reasoning_text.delta", "delta": "r"}',
     k2proxy.Frame(text="r", form=k2proxy.TextForm.REASONING)),
    ('{"done": true, "output": [{"type": "reasoning", "content": [{"type": "reasoning_text", "text": "r"}]}, '
     '{"type": "message", "content": [{"type": "output_text", "text": "a"}, {"type": "refusal", "refusal": "x"}]}]}',
     k2proxy.Frame(text="a", reasoning="r", form=k2proxy.TextForm.OUTPUT, done=True)),
    ('{"action": "web_search", "description": "Searched", "done": true}', k2proxy.Frame()),  # a status: not the end
    ('"Greeting"', None), ('{"sources": []}', k2proxy.Frame()), ('{"selected_model_id": "m"}', k2proxy.Frame()),
])
def test_payloads(payload, expected):
    assert k2proxy.parse_frame(payload) == expected


def test_sse_comments_and_fields_are_skipped():
    decoder = k2proxy.SSEDecoder(k2proxy.parse_frame)
    frames = decoder.feed(b': ping\nevent: message\nid: 3\nretry: 10\ndata: {"content": "x"}\n\n')
    assert [f.text for f in frames] == ["x"]


def test_utf8_cut_inside_a_character():
    data = 'data: {"content": "四五"}\n\n'.encode()
    decoder = k2proxy.SSEDecoder(k2proxy.parse_frame)
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


@pytest.mark.parametrize("markup,form", [("details", WHOLE), ("details_plain", WHOLE), ("tags", PIECE)])
def test_snapshot_parsing_work_grows_linearly(markup, form):
    """A 2x longer answer in snapshots costs about 2x the parser's steps, not 4x: Open WebUI's snapshots, whose
    block closer moves as the reasoning grows, and the older site's snapshots in choices form."""
    def steps(length):
        reply = Reply(reasoning="r" * length, answer="a" * length, piece=50, markup=markup)
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
                text.read(k2proxy.Frame(text=snapshot, form=form))
        finally:
            k2proxy.MarkupSplitter.feed = original
        return calls
    assert steps(20000) <= 2.2 * steps(10000)


def test_an_unclosed_summary_is_dropped_as_it_arrives():
    splitter = k2proxy.MarkupSplitter()
    splitter.feed('<details type="reasoning" done="false">\n<summary>')
    for _ in range(4000):
        splitter.feed("x" * 1024)
        assert len(splitter._pending) < len("</summary>"), "what waits for </summary> stays small"


def test_an_unclosed_summary_holds_nothing_back_and_a_closed_one_still_ends():
    reader = k2proxy.UpstreamText()
    reader.feed('<details type="reasoning" done="false">\n<summary>')
    for _ in range(3000):
        reasoning, answer = reader.feed("x" * 1024)
        assert (reasoning, answer) == ("", "")
        assert len(reader.splitter._pending) < len("</summary>"), "what waits for </summary> stays small"
    splitter = k2proxy.MarkupSplitter()
    reasoning, answer = [], []
    for char in '<details type="reasoning" done="true">\n<summary>Thought </summ</summary>\n> why\n</details>\nok':
        more_reasoning, more_answer = splitter.feed(char)
        reasoning.append(more_reasoning)
        answer.append(more_answer)
    last_reasoning, last_answer = splitter.finish()
    assert ("".join(reasoning) + last_reasoning).strip() == "why" and "".join(answer) + last_answer == "ok"


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
    out = [text.read(k2proxy.Frame(text=value, form=WHOLE if done else PIECE, done=done))
           for value, done in frames] + [text.finish()]
    assert ("".join(r for r, _ in out), "".join(a for _, a in out)) == expected


def test_answer_after_details_streams_at_once():
    """The 2026 site writes the answer bare after </details>: it is not held back until the end."""
    frames = snapshots(Reply(reasoning="Think.", answer="The answer grows word by word.", piece=5))
    text = k2proxy.UpstreamText()
    shown = [text.feed(frame)[1] for frame in frames]
    answer_frames = [a for a in shown if a]
    assert len(answer_frames) > 3 and "".join(shown) == "The answer grows word by word."


# ─── the rule of "Where the frames come from": forms mixed in one stream, examples the generator found or pins

BLOCK = ('<details type="reasoning" done="true" duration="3">\n<summary>Thought for 3 seconds</summary>\n> Why.\n'
         '</details>')
THINKING = '<details type="reasoning" done="false">\n<summary>Thinking…</summary>\n> Wh\n</details>'


def read_frames(*frames):
    """(reasoning, answer) of (form, text) frames read in turn, and what each frame emitted."""
    text, emitted = k2proxy.UpstreamText(), []
    for form, value in frames:
        emitted.append(text.read(k2proxy.Frame(text=value, form=form)))
    emitted.append(text.finish())
    return ("".join(r for r, _ in emitted), "".join(a for _, a in emitted)), emitted


@pytest.mark.parametrize("newlines", [0, 1, 2, 3])
@pytest.mark.parametrize("form", [WHOLE, PIECE])
def test_any_number_of_newlines_after_the_block_and_an_answer_that_holds_a_closer(newlines, form):
    answer = "See this:\n</details>\nand <details> too."
    assert read_frames((form, BLOCK + "\n" * newlines + answer))[0] == ("Why.", answer)


def test_a_reasoning_line_that_holds_a_closer_is_reasoning():
    """Only a line that opens with </details> ends the block; inside a quoted line it is the reasoning's text."""
    text = BLOCK.replace("> Why.", "> Use </details> to close.") + "\nDone."
    assert read_frames((WHOLE, text))[0] == ("Use </details> to close.", "Done.")


def test_an_empty_snapshot_then_pieces_is_not_taken_for_snapshots():
    """Found by the generator: an empty top-level content, then choices pieces (each shorter than the text so far
    would be, and all undecided markup until the end)."""
    assert read_frames((WHOLE, ""), *((PIECE, c) for c in "user"))[0] == ("", "user")


def test_realtime_save_reasoning_snapshots_then_answer_pieces_then_the_rewritten_whole():
    """ENABLE_REALTIME_CHAT_SAVE: the block as snapshots (its closer moving), the answer as pieces right after its
    closer, and a done event whose whole message rewrote the tag: every piece once, and none of it twice."""
    texts, emitted = read_frames((WHOLE, THINKING), (WHOLE, THINKING.replace("Wh", "Why.")), (PIECE, "Fo"),
                                 (PIECE, "ur."), (WHOLE, BLOCK + "\nFour."))
    assert texts == ("Why.", "Four.")
    assert [a for _, a in emitted] == ["", "", "Fo", "ur.", "", ""], "the answer streams piece by piece"


def test_the_whole_message_in_the_done_event_brings_the_tail_that_no_frame_held():
    assert read_frames((WHOLE, THINKING), (PIECE, "Fo"), (WHOLE, BLOCK + "\nFour, and a tail."))[0] == (
        "Why.", "Four, and a tail.")


def test_a_snapshot_that_shrinks_emits_nothing_and_growth_after_it_does():
    texts, emitted = read_frames((WHOLE, BLOCK + "\nFour and"), (WHOLE, BLOCK + "\nFour"),
                                 (WHOLE, BLOCK + "\nFour and more"))
    assert texts == ("Why.", "Four and more") and emitted[1] == ("", "")


def test_escaped_reasoning_is_shown_unescaped_and_unquoted_wherever_pieces_cut_it():
    escaped = BLOCK.replace("> Why.", "&gt; a &lt; b &amp;&amp; &#x27;c&#x27; &quot;d&quot;\n&gt; &amp;lt; stays")
    for size in (1, 2, 3, 5):
        pieces = [(PIECE, escaped[i:i + size]) for i in range(0, len(escaped), size)]
        assert read_frames(*pieces)[0] == ("a < b && 'c' \"d\"\n&lt; stays", ""), size


def test_responses_style_deltas_and_the_output_items_of_the_done_event():
    reasoning, answer = k2proxy.TextForm.REASONING, k2proxy.TextForm.ANSWER
    text = k2proxy.UpstreamText()
    shown = [text.read(k2proxy.Frame(text=t, form=f)) for f, t in ((reasoning, "Wh"), (reasoning, "y."),
                                                                   (answer, "Fo"), (answer, "ur"))]
    shown.append(text.read(k2proxy.Frame(text="Four, whole.", reasoning="Why.", form=k2proxy.TextForm.OUTPUT)))
    assert shown == [("Wh", ""), ("y.", ""), ("", "Fo"), ("", "ur"), ("", ", whole.")]


def test_a_status_whose_done_is_true_is_not_the_end():
    frames = k2proxy.SSEDecoder(k2proxy.parse_frame).feed(
        b'data: {"action": "web_search", "description": "x", "done": true}\n\n'
        b'data: {"content": "<think>Hm.</think>Still here."}\n\n')
    delta = k2proxy.SiteReader().read(frames)
    assert not delta.ended and (delta.reasoning, delta.text) == ("Hm.", "Still here.")


@pytest.mark.parametrize("reply", [Reply(realtime_save=True), Reply(style="incremental"), Reply()],
                         ids=["realtime save", "pieces", "snapshots"])
def test_mixed_frames_parsing_work_grows_linearly(reply):
    """Thousands of frames of a long answer: a 2x longer answer costs about 2x the parser's steps."""
    def steps(length):
        calls = 0
        original = k2proxy.MarkupSplitter.feed

        def counting(self, chunk):
            nonlocal calls
            calls += len(chunk)
            return original(self, chunk)
        k2proxy.MarkupSplitter.feed = counting
        try:
            text = k2proxy.UpstreamText()
            long = replace(reply, reasoning="Some thought.\n" * (length // 14), answer="word " * (length // 5),
                           piece=7)
            for frame in filter(None, map(k2proxy.parse_frame, map(payload_of, sse_events(long)))):
                text.read(frame)
        finally:
            k2proxy.MarkupSplitter.feed = original
        return calls
    assert steps(20000) <= 2.2 * steps(10000)


def payload_of(event):
    return event.rsplit("data: ", 1)[1].strip()
