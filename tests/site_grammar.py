"""Site streams generated from the grammar of shared/k2think-protocol.md, for the property-based tests.

A stream is what the model said (reasoning and answer, in chunks), the markup it came in, the Open WebUI
configuration that framed it (which form carries each frame), noise between the frames, one of the end forms, and
the byte cuts of the body. Each stream knows the exact reasoning and answer a reader must get from it: the model's
texts without their leading and trailing blanks (Open WebUI strips them too).

What the grammar leaves out is what the page says cannot be told apart: a piece that starts with all the text so
far (read as a snapshot), or one at least as long as it that opens with the same SNAPSHOT_HEAD_CHARS characters (a
snapshot whose markup was rewritten); such a piece is merged into the one before it.
"""

import json
from dataclasses import dataclass, field

from fake_upstream import details_snapshot, output_items
from hypothesis import assume
from hypothesis import strategies as st

SNAPSHOT_HEAD_CHARS = 16  # k2proxy's: a piece this alike and this long is read as a rewritten snapshot
MARKUPS = ("details", "details_answer_tags", "tags", "tags_no_answer", "lone_closer", "think_duration",
           "effort_closer", "plain")
DETAILS_MARKUPS = ("details", "details_answer_tags", "effort_closer")
CONFIGS = ("default", "realtime_save", "batched", "mixed", "older_pieces", "older_snapshots", "responses")
CLOSERS = ("<ifm|think>", "</ifm|think>", "<ifm|think_fast>", "</ifm|think_fast>", "<ifm|think_faster>",
           "</ifm|think_faster>")
FORBIDDEN = ("<think", "</think", "<answer", "</answer", "<details", "<summary", "</summary", "ifm|")
WORDS = ("The", " user", " asks", " 2 + 2", " = 4.", " 四", " ✓", " 😀", " &", " &amp;", " &gt;", " <", " >", " a<b",
         ' "q"', " it's", " `code`", "\n", "\n\n", "  ", " </details>", " [DONE]", " done", " -1", " {", "}", "\\",
         " —", "é")
USAGE = {"prompt_tokens": 9, "completion_tokens": 21, "total_tokens": 30}
NOISE = {
    "comment": ": keep-alive",
    "minus one": "data: -1",
    "event field": "event: message",
    "id field": "id: 42",
    "retry field": "retry: 3000",
    "usage": "data: " + json.dumps({"usage": USAGE}),
    "status": "data: " + json.dumps({"action": "web_search", "description": "Searching the web", "done": True}),
    "title": "data: " + json.dumps("A greeting"),
    "sources": "data: " + json.dumps({"sources": [{"source": {"name": "example.org"}}]}),
    "model id": "data: " + json.dumps({"selected_model_id": "IFM/K2-Horizon-375B-A23B"}),
    "empty choices": "data: " + json.dumps({"choices": []}),
    "empty delta": "data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": None}]}),
    "output item": "data: " + json.dumps({"type": "response.output_item.added", "item": {"type": "message"}}),
    "undecodable": "data: {not json",
}
ENDS = ("finish and done", "done", "marker", "finish only", "none")
FINISH = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}


@dataclass
class SiteStream:
    """One generated answer: its SSE body, cut into reads, and what a reader must make of it."""
    markup: str
    config: str
    reasoning: str                  # the exact reasoning a reader must give
    answer: str                     # the exact answer a reader must give
    shown: tuple                    # (reasoning, answer) a client sees, once an effort closer split them
    payloads: list                  # the SSE lines of the body, noise included, in order
    reads: list = field(default_factory=list)  # the body, cut at arbitrary bytes
    usage: dict = None
    ended: bool = False             # a done event or an end marker came
    complete_end: bool = True       # the stream has an end, so a connection torn down after it is no error

    def body(self):
        return b"".join(self.reads)


def clean(text):
    """Text the grammar may hold: no markup tags but </details>, no line that opens with '>' (Open WebUI leaves
    such a reasoning line unquoted), and no line break other than \\n (Open WebUI splits lines at those too)."""
    return (not any(tag in text for tag in FORBIDDEN) and not any(line.startswith(">") for line in text.split("\n"))
            and not any(character in text for character in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"))


texts = st.lists(st.sampled_from(WORDS) | st.text(st.characters(blacklist_categories=("Cs",)), max_size=4),
                 max_size=12).map("".join).filter(clean)


def cut(text, sizes):
    """`text` in chunks of the sizes given, taken in turn."""
    chunks, start, turn = [], 0, 0
    while start < len(text):
        size = sizes[turn % len(sizes)]
        chunks.append(text[start:start + size])
        start, turn = start + size, turn + 1
    return chunks


def raw_markup(markup, reasoning, answer):
    """The model's whole text in one of the markups that are not Open WebUI's reasoning block."""
    return {"tags": f"<think>{reasoning}</think>\n<answer>{answer}</answer>",
            "tags_no_answer": f"<think>{reasoning}</think>\n\n{answer}",
            "lone_closer": f"{reasoning}\n</think>\n\n<answer>\n{answer}\n</answer>",
            "think_duration": f'<think duration="3">{reasoning}</think>\n\n{answer}',
            "plain": answer}[markup]


def messages(markup, reasoning, answer, sizes, escaped):
    """The whole message after each chunk of the model's, as Open WebUI holds it; the chunks of what follows the
    reasoning block (or of the whole text, without one); the whole message at the end."""
    if markup not in DETAILS_MARKUPS:
        text = raw_markup(markup, reasoning, answer)
        chunks = cut(text, sizes)
        return [text[:end] for end in accumulate(chunks)], chunks, text
    after = answer if markup != "details_answer_tags" else f"<answer>{answer}</answer>"
    thinking = [details_snapshot(reasoning, shown, after, 0, escaped) for shown in accumulate(cut(reasoning, sizes))]
    chunks = cut(after, sizes)
    answering = [details_snapshot(reasoning, len(reasoning), after, answered, escaped)
                 for answered in accumulate(chunks)]
    final = details_snapshot(reasoning, len(reasoning), after, max(len(after), 1), escaped)
    return thinking + answering, (chunks if reasoning else cut(final, sizes)), final


def accumulate(chunks):
    total, ends = 0, []
    for chunk in chunks:
        total += len(chunk)
        ends.append(total)
    return ends


def ambiguous(piece, so_far):
    """Whether the page's rule reads this piece as a snapshot (see the module's docstring)."""
    return bool(so_far) and (piece.startswith(so_far) or (
        len(piece) >= len(so_far) >= SNAPSHOT_HEAD_CHARS and piece.startswith(so_far[:SNAPSHOT_HEAD_CHARS])))


def merged(pieces, so_far=""):
    """Pieces that follow `so_far` where none reads as a snapshot: such a piece joins the one before it."""
    out = []
    for piece in pieces:
        out.append(piece)
        while len(out) > 1 and ambiguous(out[-1], so_far + "".join(out[:-1])):
            last = out.pop()
            out[-1] += last
    return out


def text_frames(config, markup, reasoning, answer, sizes, forms, batch, escaped):
    """The (form, text) frames that carry the text in one configuration, and the whole message at the end."""
    whole, chunks, final = messages(markup, reasoning, answer, sizes, escaped)
    if config == "default":
        return [("whole", text) for text in whole], final
    if config == "batched":
        return [("whole", text) for number, text in enumerate(whole[:-1]) if number % batch == batch - 1], final
    if config == "older_pieces":
        return [("piece", text) for text in merged(cut(final, sizes))], final
    if config == "older_snapshots":
        return [("piece", text) for text in whole], final
    if config == "realtime_save":
        thinking = whole[:len(whole) - len(chunks)] if markup in DETAILS_MARKUPS and reasoning else []
        last = thinking[-1] if thinking else ""
        return [("whole", text) for text in thinking] + [("piece", p) for p in merged(chunks, last)], final
    frames, message = [], ""  # mixed: each frame whole or, where that reads the same, a piece
    for number, text in enumerate(whole):
        piece = text[len(message):]
        if forms[number % len(forms)] and text.startswith(message) and piece and not ambiguous(piece, message):
            frames.append(("piece", piece))
        else:
            frames.append(("whole", text))
        message = text
    return frames, final


def payload(form, text):
    if form == "whole":
        return {"content": text}
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


@st.composite
def site_streams(draw, configs=CONFIGS, markups=MARKUPS):
    """A site answer from the grammar: texts, markup, configuration, forms, noise, end, byte cuts."""
    config, markup = draw(st.sampled_from(configs)), draw(st.sampled_from(markups))
    reasoning, answer = draw(texts), draw(texts)
    if markup == "plain":
        reasoning = ""
    shown = (reasoning.strip(), answer.strip())
    if markup == "effort_closer":
        reasoning, answer = f"{shown[0]}{draw(st.sampled_from(CLOSERS))}\n\n{shown[1]}", ""
    assume(clean(reasoning) and clean(shown[0]) and clean(shown[1]))  # as reasoning lines, once stripped
    sizes = draw(st.lists(st.integers(1, 16), min_size=1, max_size=6))
    escaped = draw(st.booleans())
    if config == "responses":
        frames = [{"type": "response.reasoning_text.delta", "delta": p} for p in cut(reasoning, sizes)]
        frames += [{"type": "response.output_text.delta", "delta": p} for p in cut(answer, sizes)]
        final = {"output": output_items(reasoning, answer)}
    else:
        forms = draw(st.lists(st.booleans(), min_size=1, max_size=6))
        sent, text = text_frames(config, markup, reasoning, answer, sizes, forms, draw(st.integers(2, 4)), escaped)
        frames, final = [payload(form, piece) for form, piece in sent], {"content": text}
    lines = [json.dumps(frame, ensure_ascii=False) for frame in frames]
    if draw(st.booleans()):
        lines.insert(0, json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
    lines = ["data: " + line for line in lines]
    for _ in range(draw(st.integers(0, 4))):
        lines.insert(draw(st.integers(0, len(lines))), NOISE[draw(st.sampled_from(sorted(NOISE)))])
    if draw(st.booleans()):
        lines.insert(0, "data: " + json.dumps({"task_id": "task-1"}))
    end = draw(st.sampled_from(ENDS if config != "batched" else ENDS[:2]))
    with_final = config == "batched" or draw(st.booleans())
    done = json.dumps({"done": True, **(final if with_final else {})}, ensure_ascii=False)
    lines += {"finish and done": ["data: " + json.dumps(FINISH), "data: " + done],
              "done": ["data: " + done],
              "marker": ["data: " + draw(st.sampled_from(("[DONE]", "DONE", "done")))],
              "finish only": ["data: " + json.dumps(FINISH)], "none": []}[end]
    if end == "finish and done" and draw(st.booleans()):
        lines.append("data: [DONE]")
    if not draw(st.booleans()):
        lines = [line.replace("data: ", "data:", 1) for line in lines]
    newline = draw(st.sampled_from(("\n", "\r\n")))
    body = "".join(line + newline * 2 for line in lines).encode()
    reads = cut(body, draw(st.lists(st.integers(1, 64), min_size=1, max_size=8)))
    expected = (reasoning.strip(), answer.strip())
    return SiteStream(markup, config, *expected, shown=shown, payloads=lines, reads=reads,
                      usage=USAGE if any(NOISE["usage"].replace("data: ", "") in line for line in lines) else None,
                      ended=end in ("finish and done", "done", "marker"), complete_end=end != "none")
