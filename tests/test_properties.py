"""Property-based tests of the pure parts: upstream parsing, tool extraction, .env and token files."""

import json

from conftest import TOOL_NAMES, scan_answer
from fake_site import Reply, old_site, sse_events
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import k2proxy

MARKUP = ("<think>", "</think>", "<answer>", "</answer>", "<details", "</details>", "<summary", "</summary>")
text = st.text(st.characters(blacklist_categories=("Cs",),
                             blacklist_characters="\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
               min_size=1, max_size=80).map(str.strip).filter(bool)


def clean(value):
    """No markup, and no line that opens with ">" (Open WebUI leaves such a reasoning line unquoted)."""
    return not any(tag in value for tag in MARKUP) and not value.startswith("<") and not any(
        line.startswith(">") for line in value.split("\n"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reasoning=text, answer=text,
       markup=st.sampled_from(["details_plain", "tags", "tags_no_answer", "lone_think", "details"]),
       style_form=st.sampled_from([("snapshot", "content"), ("snapshot", "choices"), ("incremental", "choices")]),
       piece=st.integers(1, 12), cuts=st.lists(st.integers(1, 40), min_size=1, max_size=20),
       opening=st.booleans(), site=st.sampled_from([Reply, old_site]))
@example(reasoning="00", answer="0", markup="lone_think", style_form=("incremental", "choices"), piece=1, cuts=[1],
         opening=False, site=old_site)
@example(reasoning="0", answer="0", markup="details_plain", style_form=("incremental", "choices"), piece=1, cuts=[1],
         opening=False, site=Reply)
def test_any_split_of_any_stream_gives_the_same_reasoning_and_answer(reasoning, answer, markup, style_form,
                                                                     piece, cuts, opening, site):
    assume(clean(reasoning) and clean(answer))
    style, form = style_form
    body = "".join(sse_events(site(reasoning=reasoning, answer=answer, markup=markup, style=style, form=form,
                                   piece=piece, noise=True, opening=opening))).encode()
    decoder, parsed, seen = k2proxy.SSEDecoder(k2proxy.parse_frame), k2proxy.UpstreamText(), []
    start, turn = 0, 0
    while start < len(body):
        size = cuts[turn % len(cuts)]
        for frame in decoder.feed(body[start:start + size]):
            seen.append(parsed.read(frame))
        start, turn = start + size, turn + 1
    decoder.feed(b"", final=True)
    seen.append(parsed.finish())
    assert ("".join(r for r, _ in seen), "".join(a for _, a in seen)) == (reasoning, answer)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(prefix=st.text(max_size=40), value=json_values, suffix=st.text(max_size=40), step=st.integers(1, 9))
def test_tool_extraction_never_invents_a_call_from_other_json(prefix, value, suffix, step):
    document = prefix + json.dumps(value, ensure_ascii=False) + suffix
    assume("get_weather" not in document and "search" not in document)
    out = scan_answer(TOOL_NAMES, document, step)
    assert all(isinstance(piece, str) for piece in out)
    assert "".join(out) == document


@settings(max_examples=300, deadline=None)
@given(document=st.lists(st.sampled_from(list('{}[]":,` \n<>/调用函数参数:：_ab') + [
    "get_weather", "tool_calls", "<tool_call>", "</tool_call>", "```json", '"name"', '"arguments"']),
    max_size=60).map("".join), step=st.integers(1, 7))
def test_tool_extraction_never_raises_and_loses_nothing(document, step):
    out = scan_answer(TOOL_NAMES, document, step)
    if not any(isinstance(piece, k2proxy.ToolCall) for piece in out):
        assert "".join(out) == document


keys = st.from_regex(r"[A-Z_][A-Z0-9_]{0,12}", fullmatch=True)
values = st.text(st.characters(blacklist_characters='"\\\n\r', blacklist_categories=("Cs", "Zl", "Zp")), max_size=30)


@settings(max_examples=200, deadline=None)
@given(entries=st.dictionaries(keys, values, max_size=6))
def test_dotenv_round_trip_of_quoted_values(entries):
    text = "# generated\n" + "\n".join(f'{key}="{value}"  # note' for key, value in entries.items()) + "\n"
    assert k2proxy.parse_dotenv(text) == entries


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_dotenv_parser_only_ever_raises_settings_error(text):
    try:
        k2proxy.parse_dotenv(text)
    except k2proxy.SettingsError as error:
        assert str(error).startswith(".env line ")


tokens = st.from_regex(r"[A-Za-z0-9_\-.]{1,40}", fullmatch=True).filter(lambda t: not t.startswith("#"))


@settings(max_examples=200, deadline=None)
@given(chosen=st.lists(tokens, max_size=8), data=st.data())
def test_tokens_file_parser(chosen, data):
    lines = []
    for token in chosen:
        lines += data.draw(st.sampled_from([[], ["# comment"], [""], ["   "]]))
        lines.append(data.draw(st.sampled_from(["", " ", "\t"])) + token + data.draw(st.sampled_from(["", "  "])))
    assert k2proxy.parse_tokens_file("\n".join(lines)) == list(dict.fromkeys(chosen))
