"""What the Open Responses specification (2026-04-24) requires of a response object and of each streamed event,
as data, and checks of a stream against it: every field each object and event requires, with its type, and the
order of events (each output item opened, its deltas, its done events, closed; the response's end, then
`data: [DONE]`). The compliance suite validates with the same schemas; OpenAI's own item and event types that the
specification does not list (custom_tool_call and its input events) are checked by OpenAI's shapes."""

import json

NULL = type(None)
NUMBER = (int, float)
RESPONSE_FIELDS = {  # ResponseResource: all 31 fields required, each of these types
    "id": str, "object": str, "created_at": int, "completed_at": (int, NULL), "status": str,
    "incomplete_details": (dict, NULL), "model": str, "previous_response_id": (str, NULL),
    "instructions": (str, list, NULL), "output": list, "error": (dict, NULL), "tools": list,
    "tool_choice": (str, dict), "truncation": str, "parallel_tool_calls": bool, "text": dict, "top_p": NUMBER,
    "presence_penalty": NUMBER, "frequency_penalty": NUMBER, "top_logprobs": int, "temperature": NUMBER,
    "reasoning": (dict, NULL), "user": (str, NULL), "usage": (dict, NULL), "max_output_tokens": (int, NULL),
    "max_tool_calls": (int, NULL), "store": bool, "background": bool, "service_tier": str, "metadata": object,
    "safety_identifier": (str, NULL), "prompt_cache_key": (str, NULL)}
USAGE_FIELDS = {"input_tokens": int, "output_tokens": int, "total_tokens": int, "input_tokens_details": dict,
                "output_tokens_details": dict}
ITEM_FIELDS = {  # ItemField's members, and OpenAI's custom_tool_call
    "message": {"id": str, "status": str, "role": str, "content": list},
    "function_call": {"id": str, "call_id": str, "name": str, "arguments": str, "status": str},
    "function_call_output": {"id": str, "call_id": str, "output": (str, list), "status": str},
    "reasoning": {"id": str, "summary": list},
    "compaction": {"id": str, "encrypted_content": str},
    "custom_tool_call": {"id": str, "call_id": str, "name": str, "input": str, "status": str},
}
PART_FIELDS = {"output_text": {"text": str, "annotations": list}, "summary_text": {"text": str},
               "input_text": {"text": str}, "refusal": {"refusal": str}}
ITEM_EVENT = {"output_index": int}
PART_EVENT = {"item_id": str, "output_index": int}
EVENT_FIELDS = {  # each streamed event's required fields (besides type and sequence_number)
    "response.created": {"response": dict}, "response.in_progress": {"response": dict},
    "response.completed": {"response": dict}, "response.incomplete": {"response": dict},
    "response.failed": {"response": dict},
    "response.output_item.added": {**ITEM_EVENT, "item": dict},
    "response.output_item.done": {**ITEM_EVENT, "item": dict},
    "response.content_part.added": {**PART_EVENT, "content_index": int, "part": dict},
    "response.content_part.done": {**PART_EVENT, "content_index": int, "part": dict},
    "response.output_text.delta": {**PART_EVENT, "content_index": int, "delta": str},
    "response.output_text.done": {**PART_EVENT, "content_index": int, "text": str},
    "response.reasoning_summary_part.added": {**PART_EVENT, "summary_index": int, "part": dict},
    "response.reasoning_summary_part.done": {**PART_EVENT, "summary_index": int, "part": dict},
    "response.reasoning_summary_text.delta": {**PART_EVENT, "summary_index": int, "delta": str},
    "response.reasoning_summary_text.done": {**PART_EVENT, "summary_index": int, "text": str},
    "response.function_call_arguments.delta": {**PART_EVENT, "delta": str},
    "response.function_call_arguments.done": {**PART_EVENT, "arguments": str},
    "response.custom_tool_call_input.delta": {**PART_EVENT, "delta": str},
    "response.custom_tool_call_input.done": {**PART_EVENT, "input": str},
}
ENDS = ("response.completed", "response.incomplete", "response.failed")
ITEM_STREAMS = {  # an item's events between its added and done: (part opened, delta, text done, part closed)
    "message": ("response.content_part.added", "response.output_text.delta", "response.output_text.done",
                "response.content_part.done"),
    "reasoning": ("response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
                  "response.reasoning_summary_text.done", "response.reasoning_summary_part.done"),
    "function_call": (None, "response.function_call_arguments.delta", "response.function_call_arguments.done", None),
    "custom_tool_call": (None, "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done",
                         None),
    "compaction": (None, None, None, None),  # known whole at once: added, then done
}
DONE_TEXT = {"message": "text", "reasoning": "text", "function_call": "arguments", "custom_tool_call": "input"}


def fields_problems(value, fields, where):
    """What `value` lacks of `fields` (name → type or types), or has of the wrong type."""
    if not isinstance(value, dict):
        return [f"{where} is not an object"]
    problems = []
    for name, kinds in fields.items():
        if name not in value:
            problems.append(f"{where}.{name} is missing")
        elif kinds is not object and ((isinstance(value[name], bool) and bool not in _tuple(kinds))
                                      or not isinstance(value[name], kinds)):
            problems.append(f"{where}.{name} is {value[name]!r}, not of {kinds}")
    return problems


def _tuple(kinds):
    return kinds if isinstance(kinds, tuple) else (kinds,)


def item_problems(item, where):
    kind = item.get("type") if isinstance(item, dict) else None
    if kind not in ITEM_FIELDS:
        return [f"{where} has an unknown type {kind!r}"]
    problems = fields_problems(item, ITEM_FIELDS[kind], where)
    for number, part in enumerate(item.get("content") or item.get("summary") or []):
        problems += fields_problems(part, PART_FIELDS.get(part.get("type"), {"type": str}), f"{where}.part{number}")
    return problems


def response_problems(response, where="response"):
    """What a response object lacks of the specification's, its usage and output items included."""
    problems = fields_problems(response, RESPONSE_FIELDS, where)
    if problems:
        return problems
    if response["object"] != "response":
        problems.append(f"{where}.object is {response['object']!r}")
    if response["usage"] is not None:
        problems += fields_problems(response["usage"], USAGE_FIELDS, f"{where}.usage")
        problems += fields_problems(response["usage"].get("input_tokens_details"), {"cached_tokens": int},
                                    f"{where}.usage.input_tokens_details")
        problems += fields_problems(response["usage"].get("output_tokens_details"), {"reasoning_tokens": int},
                                    f"{where}.usage.output_tokens_details")
    if response["reasoning"] is not None:
        problems += fields_problems(response["reasoning"], {"effort": (str, NULL), "summary": (str, NULL)},
                                    f"{where}.reasoning")
    if response["error"] is not None:
        problems += fields_problems(response["error"], {"code": str, "message": str}, f"{where}.error")
    for number, tool in enumerate(response["tools"]):
        if tool.get("type") == "function":
            problems += fields_problems(tool, {"name": str, "description": (str, NULL), "parameters": (dict, NULL),
                                               "strict": (bool, NULL)}, f"{where}.tools[{number}]")
    answer_format = response["text"].get("format")
    if isinstance(answer_format, dict) and answer_format.get("type") == "json_schema":
        problems += fields_problems(answer_format, {"name": str, "description": (str, NULL), "strict": bool},
                                    f"{where}.text.format")
    for number, item in enumerate(response["output"]):
        problems += item_problems(item, f"{where}.output[{number}]")
    return problems


def parse_stream(raw):
    """The events of a Responses stream, and whether it ended with data: [DONE] and nothing after it."""
    events, ended, after_end = [], False, []
    for block in raw.split("\n\n"):
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if not data:
            continue
        if ended:
            after_end.append(data[0])
        elif data[0] == "[DONE]":
            ended = True
        else:
            events.append(json.loads(data[0]))
    return events, ended and not after_end


def stream_problems(raw):
    """Everything a Responses stream does against the specification: each event's fields, the sequence numbers,
    the order of events, each done text against its deltas, the final response against the items streamed, and
    the [DONE] after the end."""
    events, ended = parse_stream(raw)
    problems = [] if ended else ["the stream does not end with data: [DONE] alone after its last event"]
    return problems + events_problems(events)


def events_problems(events):
    """What a response's events do against the specification, however they came (a stream, a WebSocket's
    messages): each event's fields, the sequence numbers and the order."""
    problems = []
    for number, event in enumerate(events):
        kind = event.get("type")
        if event.get("sequence_number") != number:
            problems.append(f"event {number} ({kind}) has sequence_number {event.get('sequence_number')}")
        if kind not in EVENT_FIELDS:
            problems.append(f"event {number} has an unknown type {kind!r}")
            continue
        problems += fields_problems(event, EVENT_FIELDS[kind], f"event {number} ({kind})")
        if "response" in event:
            problems += response_problems(event["response"], f"event {number}.response")
    return problems + order_problems(events)


def order_problems(events):
    """The order the specification's streaming guide gives: created, in_progress, each item whole in turn, then
    one end event; a done text is what its deltas added up to."""
    kinds = [event.get("type") for event in events]
    if kinds[:2] != ["response.created", "response.in_progress"]:
        return [f"the stream opens with {kinds[:2]}"]
    if not kinds or kinds[-1] not in ENDS or any(kind in ENDS for kind in kinds[:-1]):
        return [f"the stream does not end with exactly one of {ENDS}: {kinds[-3:]}"]
    problems, done_items, place = [], [], 2
    while place < len(events) - 1:
        added = events[place]
        if added["type"] != "response.output_item.added" or added["output_index"] != len(done_items):
            return problems + [f"event {place} ({added['type']}) is not item {len(done_items)}'s output_item.added"]
        item = added["item"]
        opened, delta_kind, done_kind, closed = ITEM_STREAMS.get(item["type"], (None, None, None, None))
        place += 1
        if opened:
            problems += expect_kind(events, place, opened)
            place += 1
        deltas = []
        while place < len(events) and events[place]["type"] == delta_kind:
            problems += same_item(events[place], item, len(done_items), place)
            deltas.append(events[place]["delta"])
            place += 1
        if done_kind:
            problems += expect_kind(events, place, done_kind)
            if not problems and events[place][DONE_TEXT[item["type"]]] != "".join(deltas):
                problems.append(f"event {place}'s text is not what its deltas added up to")
            place += 1
        if closed:
            problems += expect_kind(events, place, closed)
            place += 1
        problems += expect_kind(events, place, "response.output_item.done")
        if problems:
            return problems
        done_items.append(events[place]["item"])
        place += 1
    final = events[-1]["response"]["output"]
    if final != done_items:
        problems.append("the final response's output is not the items streamed")
    return problems


def expect_kind(events, place, kind):
    if place >= len(events) or events[place]["type"] != kind:
        found = events[place]["type"] if place < len(events) else "the end"
        return [f"event {place} is {found}, where {kind} was due"]
    return []


def same_item(event, item, index, place):
    if event.get("item_id") != item["id"] or event.get("output_index") != index:
        return [f"event {place} names item {event.get('item_id')} at {event.get('output_index')}, not the open one"]
    return []
