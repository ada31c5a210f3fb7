"""A fake of IFM's official API, built from shared/ifm-api.md: the OpenAI-compatible API (api.ifm.ai/v1,
`fake_upstream.py --api`) or a self-hosted vLLM/SGLang server of the open weights (`--api --self-hosted`). It
enforces every documented rule with the documented error shape (keys, models, thinking fields, text-only content,
tool_call_id pairing, reasoning efforts, stop sequences, the daily cap and the per-minute guard), answers in OpenAI
chunks or one JSON document, and can truncate a stream, blank list content, or file a follow-up's whole answer under
reasoning as the effort closers do.
"""

import asyncio
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace

from aiohttp import web
from fake_model import EFFORTS, EMPTY_PROMPT_REPLY, MODEL, THINKING_FIELDS, pieces_of

DEPRECATED_MODELS = {"IFM/K2-Think-V2": "IFM/K2-Think-V2 was deprecated on 2026-09-03 and answers no more since "
                     "2026-10-03; use IFM/K2-Horizon-375B-A23B. Migration guide: https://docs.ifm.ai/migration"}
SURVIVING_FIELDS = ("reasoning", "reasoning_content")  # the thinking fields vLLM's request model keeps
MISSING_THINKING = ("Assistant message is missing a thinking field. Provide one of: think, reasoning, "
                    "reasoning_content, think_fast, think_faster.")
THINKING_NOT_STRING = "Assistant thinking fields must be strings"
DAILY_BUDGET = 10_000_000
MINUTE_BUDGET = 1_000_000  # not published: informational in x-ratelimit-limit-tokens, enforced like the real guard
CONTEXT = 524_288
MAX_STOPS = 4
ROLES = ("system", "developer", "user", "assistant", "tool")
SYSTEM_ROLES = ("system", "developer")  # K2's template places these first only
IMAGE_PARTS = ("image_url", "input_image", "image")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 410: "deprecated_model_error",
               413: "request_too_large", 422: "validation_error", 429: "rate_limit_error", 499: "request_cancelled",
               500: "api_error", 502: "upstream_error", 503: "service_unavailable", 504: "upstream_error",
               529: "overloaded_error"}
STEERED_ERRORS = {  # status -> (code, message) of an error a test asks for with ApiReply(status=...)
    408: ("request_timeout", "The request timed out before the model answered."),
    429: ("token_rate_limit", "Per-minute token budget exhausted."),
    500: ("internal_error", "The server had an error while processing your request."),
    502: ("bad_gateway", "The inference backend sent an invalid response."),
    503: ("service_unavailable", "The service is temporarily unavailable."),
    504: ("gateway_timeout", "The inference backend did not answer in time."),
    529: ("overloaded", "The model is overloaded; retry later."),
}


@dataclass
class ApiReply:
    """How FakeIFM answers one chat request; the defaults are a short greeting."""
    reasoning: str = "The user greets me. I should greet back."
    answer: str = "Hello! How can I help you today?"
    tool_calls: list = field(default_factory=list)  # [{"name", "arguments": {...}}, ...] ("id" made up unless given);
                                                    # only calls to functions the request offers are made
    json_answer: object = None       # the content when response_format asks JSON (default {"answer": answer})
    finish_reason: str | None = None  # default "tool_calls" when calls are made, else "stop" ("length" when
                                      # max_tokens cuts the answer)
    piece: int = 8                   # characters per delta: reasoning, content, tool-call argument fragments
    delay: float = 0.0               # seconds between chunks
    first_delay: float = 0.0         # seconds before the response headers
    truncate: str = ""               # "" | "before_content" (the reasoning, if any, then the connection ends) |
                                     # "mid_content" (some content or tool-call chunks, then it ends): no
                                     # finish_reason, no usage, no [DONE]; a non-streamed answer ends unanswered
    empty_followup: bool | None = None  # the effort-closer case for this reply (None: the fake's empty_followups)
    closer: str = "<ifm|think>"      # the tag that closes the reasoning in that case ("</ifm|think>" also seen)
    usage: dict | None = None        # overrides fields of the counted usage
    status: int = 200                # an error instead: 408, 429 (the minute guard), 500, 502, 503, 504, 529, ...
    retry_after: int = 37            # Retry-After of a steered 429
    error_code: str = ""             # overrides the error's code
    error_message: str = ""          # overrides the error's message
    headers: dict = field(default_factory=dict)


@dataclass
class ApiReceived:
    """One request as FakeIFM saw it; the derived fields say what a client sent where."""
    path: str
    key: str | None                  # the Bearer key (None: no Authorization header)
    session_id: str | None           # the X-Session-ID header
    headers: dict
    body: dict | None = None         # the JSON body (None: none, or not JSON)
    status: int = 0                  # what the fake answered
    effort: str | None = None        # the effort the template read: chat_template_kwargs.reasoning_effort or "high"
    effort_places: list = field(default_factory=list)  # where an effort was given: "chat_template_kwargs",
                                                       # "reasoning_effort" (top level, ignored), "extra_body" (ignored)
    extra_body: bool = False         # the body had an "extra_body" field (an SDK wrapper sent as a wire field)
    tool_formats: dict = field(default_factory=dict)   # tool_presentation_format / tool_call_format, as sent
    prompt: list = field(default_factory=list)         # the messages as the template saw them (content joined or
                                                       # blanked; "reasoning" on assistant turns)
    usage: dict | None = None        # what the answer billed


class Refused(Exception):
    """An error answer in the API's shape, raised wherever a rule is broken."""

    def __init__(self, status, message, code=None, param=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}

    def response(self, headers):
        error = {"type": ERROR_TYPES.get(self.status, "api_error"), "code": self.code, "param": self.param,
                 "message": self.message}
        return web.json_response({"error": error}, status=self.status, headers={**headers, **self.headers})


def count_tokens(text):
    """The fake's tokenizer: four characters a token."""
    return (len(text) + 3) // 4


def shared_prefix(one, other):
    """How many leading characters two strings have in common, compared character by character (the prompt cache
    is a prefix of text, not of path components)."""
    for at, (a, b) in enumerate(zip(one, other)):
        if a != b:
            return at
    return min(len(one), len(other))


def rendered(message):
    """A message as the template writes it into the prompt (what the KV cache of a session holds)."""
    calls = "".join(f"<call>{c['name']}{c['arguments']}</call>" for c in message.get("tool_calls", []))
    return f"<|{message['role']}|>{message.get('reasoning', '')}<ifm|think>{message['content']}{calls}\n"


@dataclass
class Answer:
    """What the model produced for one request, after every rule of the request was applied."""
    reasoning: str
    content: str | None
    calls: list
    finish_reason: str
    usage: dict


class FakeIFM:
    """The official IFM API, or with self_hosted=True a vLLM/SGLang server of the open weights, enforcing every rule
    of shared/ifm-api.md; set `reply`, `script` (one ApiReply per accepted request, first in first out) or `by_key`.

    keys: the accepted Bearer keys (None: any key or none, as vLLM started without --api-key); refused: keys answered
    403 permission_error. self_hosted: only reasoning/reasoning_content survive as thinking fields, only the served
    model exists (no 410), no rate limits or their headers. blanking: a server started without
    --chat-template-content-format string, which blanks list content instead of joining it. empty_followups: a
    follow-up at low or medium effort comes back all reasoning, closed by the high-effort tag, with content "" (None:
    on when self_hosted, where it was measured 16 times out of 16; off for the hosted API, where it is uncertain)."""

    def __init__(self, keys=None, refused=(), self_hosted=False, blanking=False, empty_followups=None,
                 daily_budget=DAILY_BUDGET, minute_budget=MINUTE_BUDGET, context=CONTEXT):
        self.keys = None if keys is None else set(keys)
        self.refused = set(refused)
        self.self_hosted = self_hosted
        self.blanking = blanking
        self.empty_followups = self_hosted if empty_followups is None else empty_followups
        self.daily_budget = daily_budget
        self.minute_budget = minute_budget
        self.context = context             # tokens; prompt plus max_tokens beyond it is a 422
        self.max_body = 32 * 1024 * 1024   # bytes; a larger body is a 413
        self.models = [MODEL]
        self.reply = ApiReply()
        self.script = []
        self.by_key = {}
        self.received = []
        self.clock = time.time             # tests move the day or the minute by replacing it
        self.day = int(self.clock() // 86400)
        self.daily_used = {}               # key -> tokens billed this UTC day
        self.minute = {}                   # key -> [start of the per-minute window, tokens billed in it]
        self.sessions = {}                 # X-Session-ID -> the text its node holds in KV cache
        self.open_streams = 0
        self.streams_cut_by_client = 0
        self.client_gone = asyncio.Event()
        self.app = web.Application(client_max_size=1024 * 1024 * 1024)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_post("/_fake/reply", self.set_reply)
        self.app.router.add_get("/_fake/received", self.list_received)
        self.app.router.add_get("/_fake/config", self.config)
        self.app.router.add_post("/_fake/config", self.config)
        self.app.router.add_post("/_fake/reset", self.reset)
        self.app.router.add_route("*", "/v1/{tail:.*}", self.unknown_path)

    def reply_for(self, key):
        if self.script:
            return self.script.pop(0)
        return self.by_key.get(key, self.reply)

    # --- who is asking, and their budget

    def take(self, request):
        """The request's key and its record, appended to `received`."""
        header = request.headers.get("Authorization")
        key = None if header is None else header[7:].strip() if header.startswith("Bearer ") else ""
        record = ApiReceived(request.path, key, request.headers.get("X-Session-ID"), dict(request.headers))
        self.received.append(record)
        return key, record

    def authorize(self, key):
        if key in self.refused:
            raise Refused(403, "This key may not use this model or endpoint.", "permission_denied")
        if self.keys is not None and key not in self.keys:
            raise Refused(401, "Invalid API key." if key else "Missing API key: send Authorization: Bearer <key>.",
                          "invalid_api_key")

    def window(self, key):
        """The per-minute guard's window of this key, started anew once a minute has passed."""
        now = self.clock()
        window = self.minute.get(key)
        if window is None or now - window[0] >= 60:
            window = self.minute[key] = [now, 0]
        return window

    def seconds_to_refill(self, key):
        return max(1, math.ceil(self.window(key)[0] + 60 - self.clock()))

    def roll_day(self):
        day = int(self.clock() // 86400)
        if day != self.day:
            self.day, self.daily_used = day, {}

    def limit_headers(self, key):
        """The rate-limit headers every answer of the hosted API carries (a self-hosted server sends none)."""
        if self.self_hosted:
            return {}
        self.roll_day()
        return {"x-ratelimit-limit-tokens-daily": str(self.daily_budget),
                "x-ratelimit-remaining-tokens-daily": str(max(0, self.daily_budget - self.daily_used.get(key, 0))),
                "x-ratelimit-limit-tokens": str(self.minute_budget),
                "x-ratelimit-remaining-tokens": str(max(0, self.minute_budget - self.window(key)[1])),
                "x-ratelimit-reset-tokens": str(self.seconds_to_refill(key))}

    def check_limits(self, key):
        """The daily cap (until 00:00 UTC), then the per-minute guard."""
        if self.self_hosted:
            return
        self.roll_day()
        if self.daily_used.get(key, 0) >= self.daily_budget:
            until_midnight = max(1, math.ceil(86400 - self.clock() % 86400))
            raise Refused(429, f"Daily token budget of {self.daily_budget:,} tokens exhausted for this key; it "
                          "resets at 00:00 UTC.", "daily_token_limit", headers={"Retry-After": str(until_midnight)})
        if self.window(key)[1] >= self.minute_budget:
            raise Refused(429, "Per-minute token budget exhausted.", "token_rate_limit",
                          headers={"Retry-After": str(self.seconds_to_refill(key))})

    def bill(self, key, usage):
        if not self.self_hosted:
            self.daily_used[key] = self.daily_used.get(key, 0) + usage["total_tokens"]
            self.window(key)[1] += usage["total_tokens"]

    # --- the request's rules

    def check_model(self, body):
        model = body.get("model")
        if model is None and self.self_hosted:
            return self.models[0]  # vLLM answers with its one served model
        if not isinstance(model, str) or not model:
            raise Refused(400, "model is required.", "missing_model", "model")
        if model in self.models:
            return model
        if model in DEPRECATED_MODELS and not self.self_hosted:
            raise Refused(410, DEPRECATED_MODELS[model], "model_deprecated", "model")
        raise Refused(404, f"The model `{model}` does not exist.", "model_not_found", "model")

    @staticmethod
    def note(record, body):
        """What the record says about where the client put the effort and the tool formats."""
        kwargs = body.get("chat_template_kwargs")
        extra = body.get("extra_body")
        record.extra_body = "extra_body" in body
        extra_efforts = isinstance(extra, dict) and ("reasoning_effort" in extra or "reasoning_effort" in (
            extra.get("chat_template_kwargs") if isinstance(extra.get("chat_template_kwargs"), dict) else {}))
        record.effort_places = [place for place, given in (
            ("chat_template_kwargs", isinstance(kwargs, dict) and "reasoning_effort" in kwargs),
            ("reasoning_effort", "reasoning_effort" in body), ("extra_body", extra_efforts)) if given]
        record.tool_formats = {name: body[name] for name in ("tool_presentation_format", "tool_call_format")
                               if name in body}

    def content_of(self, message, param):
        """A message's content as the template sees it: a string, text parts joined (or blanked), no images."""
        content = message.get("content")
        if content is None and message["role"] == "assistant":
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = []
            for number, part in enumerate(content):
                where = f"{param}.content[{number}]"
                if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                    raise Refused(400, f"Image input is not supported: {MODEL} is a text-only model.",
                                  "image_not_supported", where)
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise Refused(400, "Only text content parts are supported.", "invalid_content", where)
                texts.append(part["text"])
            return "" if self.blanking else "\n".join(texts)
        raise Refused(400, "Message content must be a string or a list of text parts.", "invalid_content",
                      f"{param}.content")

    def thinking_of(self, message, param):
        """An assistant turn's replayed reasoning: a string field is required ("" is valid)."""
        names = SURVIVING_FIELDS if self.self_hosted else THINKING_FIELDS
        given = [name for name in names if name in message]
        if not given:
            raise Refused(400, MISSING_THINKING, "missing_thinking_field", param)
        for name in given:
            if not isinstance(message[name], str):
                raise Refused(400, THINKING_NOT_STRING, "invalid_thinking_field", f"{param}.{name}")
        return message.get("reasoning_content", message[given[0]])

    @staticmethod
    def calls_of(message, param):
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise Refused(400, "tool_calls must be a list.", "invalid_tool_call", f"{param}.tool_calls")
        made = []
        for number, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(call.get("id"), str) and call["id"]
                    and call.get("type") == "function" and isinstance(function.get("name"), str)
                    and isinstance(function.get("arguments"), str)):
                raise Refused(400, "A tool call is {id, type: function, function: {name, arguments (a JSON string)}}.",
                              "invalid_tool_call", f"{param}.tool_calls[{number}]")
            made.append({"id": call["id"], "name": function["name"], "arguments": function["arguments"]})
        return made

    def check_messages(self, messages):
        """The prompt as the template sees it; a message breaking a rule is a 400."""
        if not isinstance(messages, list) or not messages:
            raise Refused(400, "messages must be a non-empty list.", "invalid_messages", "messages")
        prompt, pending = [], {}  # pending: calls of the last assistant turn that no tool message answered yet
        for number, message in enumerate(messages):
            param = f"messages[{number}]"
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise Refused(400, f"A message's role is one of {', '.join(ROLES)}.", "invalid_role", f"{param}.role")
            role = message["role"]
            if role in SYSTEM_ROLES and number:
                raise Refused(400, "A system message comes only first: K2's chat template has no place for one "
                              "later in the conversation.", "invalid_role", f"{param}.role")
            if pending and role != "tool":
                raise Refused(400, f"The assistant's tool call {next(iter(pending))!r} is not followed by a tool "
                              "message with its tool_call_id.", "tool_call_unanswered", param)
            if message.get("content") is None and role != "assistant":
                raise Refused(400, f"A {role} message needs content.", "invalid_content", f"{param}.content")
            seen = {"role": role, "content": self.content_of(message, param)}
            if role == "assistant":
                seen["reasoning"] = self.thinking_of(message, param)
                calls = self.calls_of(message, param)
                if calls:
                    seen["tool_calls"] = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
                pending = {call["id"]: call for call in calls}
                if len(pending) < len(calls):
                    raise Refused(400, "Tool call ids must be unique.", "invalid_tool_call", f"{param}.tool_calls")
            elif role == "tool":
                call_id = message.get("tool_call_id")
                if call_id not in pending:
                    raise Refused(400, f"The tool message answers no tool call of the assistant turn before it "
                                  f"(tool_call_id {call_id!r}).", "tool_call_id_mismatch", f"{param}.tool_call_id")
                del pending[call_id]
            prompt.append(seen)
        if pending:
            raise Refused(400, f"The assistant's tool call {next(iter(pending))!r} is not followed by a tool "
                          "message with its tool_call_id.", "tool_call_unanswered", "messages")
        return prompt

    @staticmethod
    def offered_tools(body):
        """The functions the model may call: `tools`, narrowed by `tool_choice`."""
        tools, choice = body.get("tools"), body.get("tool_choice")
        if tools is not None and not isinstance(tools, list):
            raise Refused(400, "tools must be a list.", "invalid_tools", "tools")
        names = []
        for number, tool in enumerate(tools or []):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not (isinstance(function, dict) and tool.get("type") == "function"
                    and isinstance(function.get("name"), str) and function["name"]):
                raise Refused(400, "A tool is {type: function, function: {name, description, parameters}}.",
                              "invalid_tools", f"tools[{number}]")
            names.append(function["name"])
        if choice is None or choice == "auto":
            return names
        if choice == "none":
            return []
        if choice == "required" or isinstance(choice, dict):
            if not names:
                raise Refused(400, "tool_choice needs tools.", "invalid_tool_choice", "tool_choice")
            if choice == "required":
                return names
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if name not in names:
                raise Refused(400, "tool_choice names a function that is not in tools.", "invalid_tool_choice",
                              "tool_choice")
            return [name]
        raise Refused(400, "tool_choice is auto, none, required or a named function.", "invalid_tool_choice",
                      "tool_choice")

    @staticmethod
    def effort_of(body):
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise Refused(400, "chat_template_kwargs must be an object.", "invalid_request", "chat_template_kwargs")
        effort = kwargs.get("reasoning_effort", "high")
        if effort not in EFFORTS:
            raise Refused(400, f"Unsupported reasoning_effort: {effort!r} (use low, medium or high).",
                          "unsupported_reasoning_effort", "chat_template_kwargs.reasoning_effort")
        return effort

    @staticmethod
    def check_sampling(body):
        """stop (up to 4 strings), max_tokens, stream_options only with stream, a known response_format; returns
        whether JSON was asked."""
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str):
            if not isinstance(stop, list) or not all(isinstance(item, str) for item in stop):
                raise Refused(400, "stop is a string or a list of strings.", "invalid_stop", "stop")
            if len(stop) > MAX_STOPS:
                raise Refused(400, f"stop takes at most {MAX_STOPS} sequences.", "too_many_stop_sequences", "stop")
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise Refused(400, f"{name} must be a positive integer.", "invalid_max_tokens", name)
        if body.get("stream_options") is not None and not body.get("stream"):
            raise Refused(400, "stream_options can only be given when stream is true.", "invalid_stream_options",
                          "stream_options")
        response_format = body.get("response_format")
        if response_format is None:
            return False
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                    and isinstance(spec.get("schema", {}), dict)):
                raise Refused(400, "json_schema is {name, strict, schema}.", "invalid_response_format",
                              "response_format.json_schema")
        elif kind not in ("text", "json_object"):
            raise Refused(400, "response_format type is text, json_object or json_schema.",
                          "invalid_response_format", "response_format.type")
        return kind != "text"

    # --- the answer

    def answer(self, reply, body, prompt, offered, json_wanted, effort, session_id):
        """What the model produces: the steered reply, through the request's tools, format, effort and max_tokens."""
        if prompt[-1]["role"] == "user" and not prompt[-1]["content"].strip():
            reply = replace(reply, tool_calls=[], json_answer=None, **EMPTY_PROMPT_REPLY)  # a fluent reply to nothing
        text = reply.answer
        if json_wanted:
            text = json.dumps(reply.json_answer if reply.json_answer is not None else {"answer": reply.answer},
                              ensure_ascii=False)
        calls = [{"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                  "function": {"name": call["name"], "arguments": call["arguments"] if isinstance(
                      call.get("arguments"), str) else json.dumps(call.get("arguments", {}), ensure_ascii=False)}}
                 for call in reply.tool_calls if call["name"] in offered]
        reasoning, finish = reply.reasoning, reply.finish_reason or ("tool_calls" if calls else "stop")
        closer_case = reply.empty_followup if reply.empty_followup is not None else self.empty_followups
        if closer_case and effort in ("low", "medium") and not calls and any(m["role"] == "assistant" for m in prompt):
            reasoning, text, finish = f"{reasoning}{reply.closer}\n\n{text}", "", reply.finish_reason or "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        arguments = sum(len(call["function"]["arguments"]) for call in calls)
        if limit and len(reasoning) + len(text) + arguments > 4 * limit:
            room = 4 * limit
            reasoning = reasoning[:room]
            text = text[:room - len(reasoning)]
            calls, finish = [], "length"
        content = None if calls and not text else text
        prompt_text = json.dumps(body.get("tools") or []) + "".join(rendered(message) for message in prompt)
        prompt_tokens = count_tokens(prompt_text)
        cached = 0
        if session_id:
            held = self.sessions.get(session_id, "")
            cached = min(prompt_tokens, shared_prefix(held, prompt_text) // 4)
            made = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
            self.sessions[session_id] = prompt_text + rendered(
                {"role": "assistant", "reasoning": reasoning, "content": text, "tool_calls": made})
        reasoning_tokens = count_tokens(reasoning)
        completion_tokens = reasoning_tokens + count_tokens(text) + count_tokens("x" * arguments)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached},
                 "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}, **(reply.usage or {})}
        return Answer(reasoning, content, calls, finish, usage)

    async def chat(self, request):
        key, record = self.take(request)
        try:
            self.authorize(key)
            raw = await request.read()
            if len(raw) > self.max_body:
                raise Refused(413, f"The body is larger than {self.max_body} bytes.", "request_too_large")
            try:
                body = json.loads(raw)
            except ValueError:
                raise Refused(400, "The body is not valid JSON.", "invalid_json") from None
            if not isinstance(body, dict):
                raise Refused(400, "The body must be a JSON object.", "invalid_json")
            record.body = body
            self.note(record, body)
            model = self.check_model(body)
            prompt = record.prompt = self.check_messages(body.get("messages"))
            offered = self.offered_tools(body)
            record.effort = effort = self.effort_of(body)
            json_wanted = self.check_sampling(body)
            asked = max(body.get("max_completion_tokens") or body.get("max_tokens") or 1, 1)
            if count_tokens("".join(rendered(message) for message in prompt)) + asked > self.context:
                raise Refused(422, f"The prompt and max_tokens exceed the model's context of {self.context} tokens.",
                              "context_length_exceeded", "messages")
            self.check_limits(key)
            reply = self.reply_for(key)
            if reply.status != 200:
                code, message = STEERED_ERRORS.get(reply.status, ("error", "Steered error."))
                headers = {"Retry-After": str(reply.retry_after), "x-ratelimit-remaining-tokens": "0",
                           "x-ratelimit-reset-tokens": str(reply.retry_after)} if reply.status == 429 else {}
                raise Refused(reply.status, reply.error_message or message, reply.error_code or code,
                              headers={**headers, **reply.headers})
        except Refused as refused:
            record.status = refused.status
            return refused.response(self.limit_headers(key))
        answer = self.answer(reply, body, prompt, offered, json_wanted, effort, record.session_id)
        record.usage = answer.usage
        self.bill(key, answer.usage)
        headers = {**self.limit_headers(key), **reply.headers}
        if reply.first_delay:
            await asyncio.sleep(reply.first_delay)
        record.status = 200
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return await self.stream(request, reply, answer, model, include_usage, headers)
        if reply.truncate:
            request.transport.close()  # the connection drops mid-generation: no answer at all
            return web.Response()
        message = {"role": "assistant", "content": answer.content, "reasoning_content": answer.reasoning or None,
                   "reasoning": answer.reasoning or None, "tool_calls": answer.calls}
        return web.json_response({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                         "finish_reason": answer.finish_reason}],
            "usage": answer.usage}, headers=headers)

    @staticmethod
    def chunks(reply, answer, model, include_usage):
        """The SSE events of a streamed answer, and whether it is cut (then no finish_reason, usage or [DONE])."""
        reasoning = [{"reasoning_content": piece, "reasoning": piece}
                     for piece in pieces_of(answer.reasoning, reply.piece)]
        tail = [{"content": piece} for piece in pieces_of(answer.content or "", reply.piece)]
        for index, call in enumerate(answer.calls):
            function = call["function"]
            tail.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                         "function": {"name": function["name"], "arguments": ""}}]})
            tail += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                     for piece in pieces_of(function["arguments"], reply.piece)]
        frames = [({"role": "assistant", "content": ""}, None)] + [(delta, None) for delta in reasoning]
        if reply.truncate == "mid_content":
            frames += [(delta, None) for delta in tail[:max(1, len(tail) // 2)]]
        elif not reply.truncate:
            tail = tail or [{"content": ""}]
            frames += [(delta, None) for delta in tail[:-1]] + [(tail[-1], answer.finish_reason)]
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model}
        payloads = [{**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                    for delta, finish in frames]
        if include_usage and not reply.truncate:
            payloads.append({**base, "choices": [], "usage": answer.usage})
        events = [f"data: {json.dumps(payload, ensure_ascii=False)}\n\n" for payload in payloads]
        return events + ([] if reply.truncate else ["data: [DONE]\n\n"])

    async def stream(self, request, reply, answer, model, include_usage, headers):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **headers})
        await response.prepare(request)
        self.open_streams += 1
        try:
            for event in self.chunks(reply, answer, model, include_usage):
                await response.write(event.encode())
                if reply.delay:
                    await asyncio.sleep(reply.delay)
            if reply.truncate:
                request.transport.close()  # what was written goes out; the chunked body never ends
                return response
            await response.write_eof()
            return response
        except (asyncio.CancelledError, ConnectionError):
            self.streams_cut_by_client += 1
            self.client_gone.set()
            raise
        finally:
            self.open_streams -= 1

    async def list_models(self, request):
        key, record = self.take(request)
        try:
            self.authorize(key)
        except Refused as refused:
            record.status = refused.status
            return refused.response(self.limit_headers(key))
        record.status = 200
        data = [{"id": model, "object": "model", "created": 1788220800, "owned_by": "IFM", "root": model,
                 "max_model_len": self.context} for model in self.models]
        return web.json_response({"object": "list", "data": data}, headers=self.limit_headers(key))

    async def unknown_path(self, request):
        key, record = self.take(request)
        record.status = 404
        return Refused(404, f"No route {request.method} {request.path}.", "unknown_path").response(
            self.limit_headers(key))

    # --- steering, for a fake that runs as a process

    @staticmethod
    def reply_of(values):
        known = {f.name for f in fields(ApiReply)}
        return ApiReply(**{k: v for k, v in values.items() if k in known})

    async def set_reply(self, request):
        """A reply's fields set the default reply, with "key" that key's reply; {"script": [...]} the replies of the
        next accepted requests, in order."""
        values = await request.json()
        if "script" in values:
            self.script = [self.reply_of(item) for item in values["script"]]
            return web.json_response({"script": len(self.script)})
        reply = self.reply_of(values)
        if "key" in values:
            self.by_key[values["key"]] = reply
        else:
            self.reply = reply
        return web.json_response(asdict(reply))

    async def list_received(self, request):
        """Every request the /v1 routes received, as ApiReceived dicts."""
        return web.json_response([asdict(record) for record in self.received])

    SETTINGS = ("keys", "refused", "self_hosted", "blanking", "empty_followups", "daily_budget", "minute_budget",
                "context", "models", "daily_used")

    async def config(self, request):
        """POST sets any of SETTINGS (keys and refused as lists, daily_used as {key: tokens}); both answer them."""
        if request.method == "POST":
            for name, value in (await request.json()).items():
                if name not in self.SETTINGS:
                    return web.json_response({"unknown setting": name}, status=400)
                if name in ("keys", "refused") and value is not None:
                    value = set(value)
                setattr(self, name, value)
        settings = {name: getattr(self, name) for name in self.SETTINGS}
        settings.update({name: sorted(settings[name]) for name in ("keys", "refused") if settings[name] is not None})
        return web.json_response(settings)

    async def reset(self, request):
        """Forgets what was received, steered and billed: the next test starts from a fresh fake."""
        self.reply, self.script, self.by_key, self.received = ApiReply(), [], {}, []
        self.daily_used, self.minute, self.sessions = {}, {}, {}
        return web.json_response({"reset": True})
