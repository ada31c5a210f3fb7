"""A fake of the K2Think web service, built from shared/k2think-protocol.md.

By default it is the 2026 site (K2 Horizon at chat.ifm.ai) with its rules
enforced: unknown model ids, the chat_id/id/session_id trio (answered with a
bare task_id, as Open WebUI does when it answers over its websocket), assistant
turns without a thinking field, and reasoning efforts it does not know. Its
answers open with a task_id event and a raw role chunk, carry Open WebUI's
snapshots of the whole message (the <details> block, closed at every step, then
the answer), and end with a raw finish chunk, a done event repeating the whole
message, and a connection torn down without a clean end. The older site
(`site="k2think"`, and `old_site()` replies) stays available.

It can answer in every variant the protocol page lists (snapshot or
incremental frames, each reasoning markup, JSON where a stream was asked,
noise, cut points, delays, drops, hangs, error statuses, per-token answers)
and records what it received. Tests drive it in-process; the benchmark and
end-to-end tests run it as a process (`python tests/fake_upstream.py --port N`)
and steer it through its /_fake routes.

The 2026 variants: each Open WebUI configuration of the protocol page (its default, the one the fake sends unless
told otherwise; Reply.realtime_save, batch, escaped, responses, extras, done_content; a generated body in
Reply.raw), a done event whose snapshot holds a tail no snapshot showed (Reply.done_tail), <think duration="N">
markup, follow-ups at low or medium effort filed wholly as reasoning with the answer after an effort closer
(`empty_followups`, on by default; Reply.closer), a template that blanks content that is not a string
(`blanking`), one that refuses null thinking fields, and the effort field the template reads (`effort_from`:
extra_body, the default, chat_template_kwargs, both or neither; Received.effort is the effort acted on).

FakeIFM is the other upstream kind, built from shared/ifm-api.md: the official OpenAI-compatible API
(api.ifm.ai/v1, `--api`) or a self-hosted vLLM/SGLang server of the open weights (`--api --self-hosted`). It
enforces every documented rule with the documented error shape (keys, models, thinking fields, text-only content,
tool_call_id pairing, reasoning efforts, stop sequences, the daily cap and the per-minute guard), answers in OpenAI
chunks or one JSON document, and can truncate a stream, blank list content, or file a follow-up's whole answer under
reasoning as the effort closers do.
"""

import argparse
import asyncio
import base64
import html
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace

from aiohttp import web

MODEL = "IFM/K2-Horizon-375B-A23B"
OLD_MODEL = "MBZUAI-IFM/K2-Think"
THINKING_FIELDS = ("think", "reasoning", "reasoning_content", "think_fast", "think_faster")
EFFORTS = ("low", "medium", "high")
MODEL_NOT_FOUND = {"detail": "Model not found"}
AUTH_EXPIRED = {"detail": "Your session has expired or the token is invalid. Please sign in again."}
WRONG_PASSWORD = {"detail": "The email or password provided is incorrect. "
                            "Please check for typos and try logging in again."}


def make_jwt(exp, account_id="0b7c2a5e-6a55-4b7e-9c43-5a0c4c1f6e21", signature="c2lnbmF0dXJl"):
    """An HS256-shaped JWT carrying `id` and `exp`, as K2Think issues (the signature is not checked here)."""
    def segment(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{segment({'alg': 'HS256', 'typ': 'JWT'})}.{segment({'id': account_id, 'exp': int(exp)})}.{signature}"


@dataclass
class Reply:
    """How the fake answers one chat request; the defaults are what the 2026 site sends (Open WebUI's default
    configuration: a raw role chunk, top-level snapshots of the whole message, a raw finish chunk, usage, a done
    event with the last snapshot)."""
    reasoning: str = "The user greets me. I should greet back."
    answer: str = "Hello! How can I help you today?"
    markup: str = "details_plain"  # details_plain | details | tags | tags_no_answer | lone_think | plain |
                                   # think_duration (<think duration="2">, the older site in 2026)
    style: str = "snapshot"       # snapshot | incremental
    form: str | None = None       # content (top-level "content") | choices (OpenAI delta); None: content for
                                  # snapshots, choices for pieces (a top-level content is always the whole message)
    task_id: bool = True          # a first {"task_id": ...} event
    role_chunk: bool = True       # a raw first chunk with the role and no text, as Open WebUI forwards it
    opening: bool = False         # a first frame with an empty text, as OpenAI-style streams begin
    json_answer: bool = False     # one application/json document even though a stream was asked
    piece: int = 6                # characters the model adds per frame
    delay: float = 0.0            # seconds between frames
    first_delay: float = 0.0      # seconds before the response headers
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46})
    usage_alone: bool = True      # usage in a frame of its own, else in the last text frame
    finish_reason: str | None = None  # in the last text frame ("length", "content_filter"), choices form only;
                                      # with end=finish_done, in the finish chunk (default "stop")
    end: str = "finish_done"      # finish_done (a finish chunk, then {"done": true, "content": <all>}) |
                                  # [DONE] | DONE | done | done_json | none
    done_content: bool = True     # the done event of finish_done carries the last snapshot (or the output items)
    ragged: bool = True           # after its end, the connection is torn down without closing the body
    noise: bool = True            # "-1" frames and SSE comments between frames
    extras: bool = False          # events without text: a status whose done is true, a bare title string,
                                  # sources, selected_model_id
    crlf: bool = False            # \r\n line endings
    chunk_bytes: int = 0          # write the body in slices of this many bytes (cuts lines and UTF-8)
    drop_after: int = -1          # frames sent before the connection is cut
    hang_after: int = -1          # frames sent before going silent for good
    error_after: int = -1         # frames sent before an in-stream {"detail": ...} error frame
    garbage: bool = False         # undecodable frames among the good ones
    status: int = 200
    body: str = ""                # the whole answer instead of a stream (any status)
    headers: dict = field(default_factory=dict)
    content_type: str = ""        # overrides the answer's content type
    realtime_save: bool = False   # ENABLE_REALTIME_CHAT_SAVE: the reasoning block as top-level snapshots, what
                                  # follows it only as choices pieces appended to the last one
    batch: int = 0                # delta batching (CHAT_RESPONSE_STREAM_DELTA_CHUNK_SIZE): every batch-th snapshot
                                  # is sent, and the last text only in the done event
    escaped: bool = False         # newer Open WebUI: the quoted reasoning goes through html.escape
    responses: bool = False       # Open WebUI's development line: response.*.delta events, then a done event with
                                  # the output items and no content
    done_tail: str = ""           # more answer that only the done event's final content snapshot holds
    raw: tuple = ()               # a generated body (tests/site_grammar.py): these reads, written as they are
    empty_followup: bool | None = None  # the effort-closer case for this reply (None: the fake's empty_followups)
    closer: str = "<ifm|think>"   # the tag between the reasoning and the answer in that case

    def __post_init__(self):
        if self.form is None:
            self.form = "choices" if self.style == "incremental" else "content"
        if self.style == "incremental" and self.form == "content":
            raise ValueError("a top-level content is the whole message so far: pieces come as choices")


OLD_SITE = {"markup": "tags", "form": "choices", "task_id": False, "role_chunk": False, "end": "[DONE]",
            "ragged": False}
DETAILS = ("details", "details_plain")
DURATION = 2


def old_site(**changes):
    """A reply in the older site's dialect (www.k2think.ai): tags, OpenAI chunks, [DONE], a clean end."""
    return Reply(**{**OLD_SITE, **changes})


def quoted(text, escaped=False):
    """Open WebUI's display of reasoning: each line quoted with "> " unless it starts with ">", maybe escaped."""
    lines = "\n".join(line if line.startswith(">") else "> " + line for line in text.splitlines())
    return html.escape(lines) if escaped else lines


def details_snapshot(reasoning, shown, answer_markup, answered, escaped=False):
    """Open WebUI's message (serialize_content_blocks): the reasoning block, closed at every step and rewritten
    when the answer begins, then the answer's text block; the whole stripped. No reasoning, no block."""
    if not reasoning:
        return answer_markup[:answered].strip()
    if not answered:
        return ('<details type="reasoning" done="false">\n<summary>Thinking…</summary>\n'
                + quoted(reasoning[:shown], escaped) + "\n</details>")
    return (f'<details type="reasoning" done="true" duration="{DURATION}">\n<summary>Thought for {DURATION} '
            f'seconds</summary>\n' + quoted(reasoning, escaped) + "\n</details>\n"
            + answer_markup[:answered].strip()).strip()


def answer_markup(reply):
    """What follows </details>: the 2026 site writes the answer bare, the older one in <answer> tags."""
    return reply.answer if reply.markup == "details_plain" else f"<answer>{reply.answer}</answer>"


def full_text(reply):
    r, a = reply.reasoning, reply.answer
    if reply.markup in DETAILS:
        return details_snapshot(r, len(r), answer_markup(reply), max(len(answer_markup(reply)), 1), reply.escaped)
    return {
        "tags": f"<think>{r}</think>\n<answer>{a}</answer>",
        "tags_no_answer": f"<think>{r}</think>\n\n{a}",
        "lone_think": f"{r}\n</think>\n\n<answer>\n{a}\n</answer>",
        "think_duration": f'<think duration="2">{r}</think>\n\n{a}',
        "plain": a,
    }[reply.markup]


def reasoning_snapshots(reply):
    """Open WebUI's message after each piece of reasoning, while the model thinks."""
    return [details_snapshot(reply.reasoning, shown, "", 0, reply.escaped)
            for shown in range(reply.piece, len(reply.reasoning) + reply.piece, reply.piece)]


def snapshots(reply):
    """The whole text after each frame, as a snapshot-style upstream sends it."""
    if reply.markup not in DETAILS:
        text = full_text(reply)
        return [text[:end] for end in range(reply.piece, len(text) + reply.piece, reply.piece)] or [""]
    answer_markup_text = answer_markup(reply)
    steps = reasoning_snapshots(reply) if reply.reasoning else []
    steps += [details_snapshot(reply.reasoning, len(reply.reasoning), answer_markup_text, answered, reply.escaped)
              for answered in range(reply.piece, len(answer_markup_text) + reply.piece, reply.piece)]
    if reply.reasoning and not answer_markup_text:
        steps.append(full_text(reply))  # no answer: the block still closes, with nothing after </details>
    return steps


def pieces_of(text, size):
    return [text[start:start + size] for start in range(0, len(text), size)]


def text_frames(reply):
    """(form, text) of each frame that carries text: "content" frames hold the whole message so far, "choices"
    frames a piece (or, with style=snapshot, the older site's snapshot)."""
    if reply.realtime_save and reply.markup in DETAILS and reply.reasoning:
        return ([("content", text) for text in reasoning_snapshots(reply)]
                + [("choices", piece) for piece in pieces_of(answer_markup(reply), reply.piece)])
    texts = snapshots(reply) if reply.style == "snapshot" else pieces_of(full_text(reply), reply.piece)
    if reply.batch:
        texts = [text for number, text in enumerate(texts[:-1]) if number % reply.batch == reply.batch - 1]
    return [(reply.form, text) for text in texts]


def responses_payloads(reply):
    """Open WebUI's development line: the reasoning and the answer as Responses-style deltas."""
    events = [{"type": "response.output_item.added", "item": {"type": "reasoning", "id": "rs_1"}}]
    events += [{"type": "response.reasoning_text.delta", "delta": piece}
               for piece in pieces_of(reply.reasoning, reply.piece)]
    events.append({"type": "response.output_item.added", "item": {"type": "message", "id": "msg_1"}})
    events += [{"type": "response.output_text.delta", "delta": piece}
               for piece in pieces_of(reply.answer, reply.piece)]
    return [json.dumps(event, ensure_ascii=False) for event in events]


def output_items(reasoning, answer):
    return [{"type": "reasoning", "id": "rs_1", "content": [{"type": "reasoning_text", "text": reasoning}]},
            {"type": "message", "id": "msg_1", "role": "assistant",
             "content": [{"type": "output_text", "text": answer}]}]


EXTRAS = [json.dumps({"action": "web_search", "description": "Searched 3 sites", "done": True}),
          json.dumps({"selected_model_id": MODEL}), json.dumps({"sources": [{"source": {"name": "web"}}]}),
          json.dumps("Greeting exchange")]  # a status (its done is not the end), a model id, sources, the title


def frame_payloads(reply):
    """The SSE payloads of one answer, in order."""
    payloads = [json.dumps({"task_id": str(uuid.uuid4())})] if reply.task_id else []
    if reply.role_chunk:
        payloads.append(json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]}))
    frames = [(reply.form, "")] * reply.opening + ([] if reply.responses else text_frames(reply))
    last_finish = None if reply.end == "finish_done" else reply.finish_reason
    texts = responses_payloads(reply) if reply.responses else []
    for number, (form, text) in enumerate(frames):
        if form == "content":
            obj = {"content": text}
        else:
            delta = {"content": text}
            if number == 0 and not reply.role_chunk:
                delta = {"role": "assistant", **delta}
            last = number == len(frames) - 1
            obj = {"choices": [{"index": 0, "delta": delta, "finish_reason": last_finish if last else None}]}
        if reply.usage and not reply.usage_alone and number == len(frames) - 1:
            obj["usage"] = reply.usage
        texts.append(json.dumps(obj, ensure_ascii=False))
    if reply.extras:
        for number, extra in enumerate(EXTRAS):
            texts.insert(min(len(texts), number * max(1, len(texts) // len(EXTRAS))), extra)
    payloads += texts
    if reply.usage and reply.usage_alone:
        payloads.append(json.dumps({"usage": reply.usage}))
    if reply.end == "finish_done":
        payloads.append(json.dumps({"choices": [{"index": 0, "delta": {},
                                                 "finish_reason": reply.finish_reason or "stop"}]}))
        whole = replace(reply, answer=reply.answer + reply.done_tail) if reply.done_tail else reply
        done = {"done": True}
        if reply.done_content and reply.responses:
            done["output"] = output_items(whole.reasoning, whole.answer)
        elif reply.done_content:
            done["content"] = full_text(whole)
        payloads.append(json.dumps(done, ensure_ascii=False))
    return payloads


def sse_events(reply):
    """The SSE body of one answer, one string per frame, noise and end marker included."""
    newline = "\r\n" if reply.crlf else "\n"
    events = []
    for number, payload in enumerate(frame_payloads(reply)):
        extra = f": comment{newline}data: -1{newline}{newline}" if reply.noise and number % 3 == 1 else ""
        if reply.garbage and number % 4 == 2:
            extra += f"data: {{not json{newline}{newline}data: 12{newline}{newline}event: ping{newline}{newline}"
        events.append(f"{extra}data: {payload}{newline}{newline}")
    end = {"[DONE]": "[DONE]", "DONE": "DONE", "done": "done", "done_json": '{"done": true}'}.get(reply.end)
    if end:
        events.append(f"data: {end}{newline}{newline}")
    return events


def json_document(reply):
    return {"id": "chatcmpl-fake", "model": OLD_MODEL, "created": int(time.time()),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": full_text(reply)},
                         "finish_reason": "stop"}],
            "usage": reply.usage}


@dataclass
class Received:
    path: str
    headers: dict
    body: dict
    token: str
    effort: str = None            # the effort the template acted on (from the fields of effort_from; else high)
    prompt: list = None           # the messages as the template saw them (non-string content blanked, if blanking)


EFFORT_FROM = ("extra_body", "chat_template_kwargs", "both", "neither")


SITES = {  # what each site serves, and the reply it gives by default
    "k2horizon": ({"id": MODEL, "name": "K2 Horizon", "owned_by": "IFM"}, Reply),
    "k2think": ({"id": OLD_MODEL, "name": "K2-Think", "owned_by": "MBZUAI-IFM"}, old_site),
}


class FakeK2Think:
    """The fake service: set `reply`, `script` (one Reply per request, first in first out) or `by_token`."""

    def __init__(self, site="k2horizon"):
        model, self.make_reply = SITES[site]
        self.site = site
        self.reply = self.make_reply()
        self.script = []
        self.by_token = {}
        self.received = []
        self.models = [model]
        self.models_bare = False           # answer the model list as a bare array
        self.effort_from = "extra_body"    # where the template reads the effort: one of EFFORT_FROM
        self.empty_followups = True        # low/medium follow-ups come back all reasoning, split by a closer
        self.blanking = False              # the template blanks content that is not a string
        self.accounts = {}                 # email -> password
        self.signin_status = 200           # anything else: the sign-in endpoint fails this way
        self.signin_cookie_only = False    # the token only in Set-Cookie, not in the body
        self.token_lifetime = 3600
        self.signins = []                  # (email, issued token or None, time), in order
        self.open_streams = 0
        self.streams_cut_by_client = 0
        self.client_gone = asyncio.Event()
        self.app = web.Application(client_max_size=256 * 1024 * 1024)
        self.app.router.add_post("/api/guest/chat/completions", self.chat)
        self.app.router.add_post("/api/chat/completions", self.chat)
        self.app.router.add_get("/api/models", self.list_models)
        self.app.router.add_post("/api/v1/auths/signin", self.sign_in)
        self.app.router.add_post("/_fake/reply", self.set_reply)
        self.app.router.add_get("/_fake/received", self.list_received)

    def reply_for(self, token):
        if self.script:
            return self.script.pop(0)
        return self.by_token.get(token, self.reply)

    async def chat(self, request):
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        try:
            body = await request.json()
        except ValueError:
            body = None
        self.received.append(Received(request.path, dict(request.headers), body, token))
        refusal = self.refusal(body)
        if refusal:
            return refusal
        reply = self.as_the_template_reads(self.reply_for(token), body, self.received[-1])
        if reply.first_delay:
            await asyncio.sleep(reply.first_delay)
        if request.path == "/api/chat/completions" and not token:
            return web.json_response(AUTH_EXPIRED, status=401)
        if reply.status != 200 or reply.body:
            return await self.send(request, reply, reply.body, reply.content_type or "application/json")
        if reply.json_answer:
            return await self.send(request, reply, json.dumps(json_document(reply)), "application/json")
        return await self.stream(request, reply)

    def refusal(self, body):
        """The site's answer to a payload it does not take as a chat request, or None: every site refuses an
        unknown model; the 2026 site also the chat_id/id/session_id trio (its HTTP answer is then a bare
        task_id), an assistant turn without a thinking field, and an effort its template does not know."""
        served = [m.get("id") for m in self.models] if isinstance(self.models, list) else [SITES[self.site][0]["id"]]
        if not isinstance(body, dict) or body.get("model") not in served:
            return web.json_response(MODEL_NOT_FOUND, status=400)
        if self.site != "k2horizon":
            return None
        if all(key in body for key in ("chat_id", "id", "session_id")):
            return web.json_response({"status": True, "task_id": str(uuid.uuid4())})
        for message in body.get("messages") or []:
            if message.get("role") == "assistant" and not any(name in message for name in THINKING_FIELDS):
                return web.json_response({"detail": "Assistant message is missing a thinking field"}, status=400)
            if message.get("role") == "assistant" and any(
                    not isinstance(message[name], str) for name in THINKING_FIELDS if name in message):
                return web.json_response({"detail": "Assistant thinking fields must be strings"}, status=400)
        for effort in self.efforts_given(body):
            if effort not in EFFORTS:
                return web.json_response({"detail": f"Unknown reasoning_effort: {effort}"}, status=400)
        return None

    def efforts_given(self, body):
        """The efforts given in the fields the template reads (effort_from), top-level chat_template_kwargs first."""
        places = {"extra_body": ("extra_body",), "chat_template_kwargs": ("top",), "both": ("top", "extra_body"),
                  "neither": ()}[self.effort_from]
        found = []
        for place in places:
            holder = body if place == "top" else body.get("extra_body")
            kwargs = holder.get("chat_template_kwargs") if isinstance(holder, dict) else None
            effort = kwargs.get("reasoning_effort") if isinstance(kwargs, dict) else None
            if effort is not None:
                found.append(effort)
        return found

    def as_the_template_reads(self, reply, body, record):
        """The reply to this request at the effort and prompt the template saw, both noted in its record."""
        # effort: from the fields of effort_from, else the template's default (high). With `blanking`, content that
        # is not a string is blanked, and an empty last user turn gets a fluent reply to nothing. With
        # empty_followups (or the reply's empty_followup), a follow-up at low or medium effort comes all
        # reasoning: the answer follows the reply's closer inside it, and nothing follows </details>.
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)] if isinstance(body, dict) else []
        record.effort = next(iter(self.efforts_given(body)), "high") if isinstance(body, dict) else None
        record.prompt = [{**m, "content": m.get("content") if isinstance(m.get("content"), str) else ""}
                         if self.blanking else m for m in messages]
        if self.blanking and record.prompt and record.prompt[-1].get("role") == "user" \
                and not record.prompt[-1]["content"].strip():
            reply = replace(reply, **EMPTY_PROMPT_REPLY)
        closer_case = reply.empty_followup if reply.empty_followup is not None else self.empty_followups
        if closer_case and self.site == "k2horizon" and record.effort in ("low", "medium") \
                and any(m.get("role") == "assistant" for m in messages):
            reply = replace(reply, reasoning=f"{reply.reasoning}{reply.closer}\n\n{reply.answer}", answer="")
        return reply

    async def send(self, request, reply, text, content_type):
        """One whole body, in slices of reply.chunk_bytes when set."""
        response = web.StreamResponse(status=reply.status, headers={"Content-Type": content_type, **reply.headers})
        await response.prepare(request)
        await self.write(response, reply, text)
        await response.write_eof()
        return response

    async def stream(self, request, reply):
        response = web.StreamResponse(headers={"Content-Type": reply.content_type or "text/event-stream",
                                               "Cache-Control": "no-cache", **reply.headers})
        await response.prepare(request)
        self.open_streams += 1
        try:
            for data in reply.raw:
                await response.write(data)
            for number, event in enumerate(() if reply.raw else sse_events(reply)):
                if number == reply.drop_after:
                    request.transport.abort()
                    return response
                if number == reply.hang_after:
                    await asyncio.Event().wait()
                if number == reply.error_after:
                    event = f"data: {json.dumps({'detail': 'Internal model error'})}\n\n"
                await self.write(response, reply, event)
                if number == reply.error_after:
                    break
                if reply.delay:
                    await asyncio.sleep(reply.delay)
            if reply.ragged and reply.error_after < 0:
                request.transport.close()  # what was written still goes out; the chunked body never ends
                return response
            await response.write_eof()
            return response
        except (asyncio.CancelledError, ConnectionError):
            self.streams_cut_by_client += 1
            self.client_gone.set()
            raise
        finally:
            self.open_streams -= 1

    @staticmethod
    async def write(response, reply, text):
        data = text.encode()
        size = reply.chunk_bytes or max(len(data), 1)
        for start in range(0, len(data), size):
            await response.write(data[start:start + size])
            if reply.chunk_bytes:
                await asyncio.sleep(0.001)

    async def list_models(self, request):
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return web.json_response(AUTH_EXPIRED, status=401)
        if self.models is None:
            return web.Response(status=500, text="Internal Server Error")
        return web.json_response(self.models if self.models_bare else {"data": self.models})

    async def sign_in(self, request):
        body = await request.json()
        email = body.get("email")
        if self.signin_status != 200:
            self.signins.append((email, None, time.time()))
            return web.Response(status=self.signin_status, text="upstream trouble")
        if self.accounts.get(email) != body.get("password"):
            self.signins.append((email, None, time.time()))
            return web.json_response(WRONG_PASSWORD, status=400)
        token = make_jwt(time.time() + self.token_lifetime, email, f"sig{len(self.signins)}")
        self.signins.append((email, token, time.time()))
        answer = {"id": email, "email": email, "name": email.split("@")[0], "role": "user", "token_type": "Bearer"}
        if not self.signin_cookie_only:
            answer["token"] = token
        response = web.json_response(answer)
        response.set_cookie("token", token, httponly=True, samesite="Lax")
        return response

    def reply_of(self, values):
        """A Reply from steering JSON: its fields, in the dialect of `site` (default: this fake's site)."""
        known = {f.name for f in fields(Reply)}
        make = SITES[values.get("site", self.site)][1]
        return make(**{k: v for k, v in values.items() if k in known})

    async def set_reply(self, request):
        """Steers a fake that runs as a process: a reply's fields set the default reply, with "token" that
        token's reply; {"script": [...]} the replies of the next requests, in order."""
        values = await request.json()
        if "script" in values:
            self.script = [self.reply_of(item) for item in values["script"]]
            return web.json_response({"script": len(self.script)})
        reply = self.reply_of(values)
        if "token" in values:
            self.by_token[values["token"]] = reply
        else:
            self.reply = reply
        return web.json_response(asdict(reply))

    async def list_received(self, request):
        """What the chat endpoints received, for tests that run the fake as a process."""
        return web.json_response([{"path": r.path, "body": r.body, "token": r.token, "effort": r.effort}
                                  for r in self.received])



# The official IFM API (api.ifm.ai/v1) and self-hosted vLLM/SGLang servers of the open weights, from
# shared/ifm-api.md. Everything below is FakeIFM's; FakeK2Think above does not use it.

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
EMPTY_PROMPT_REPLY = {"reasoning": "The message is empty. I should ask what the user would like.",
                      "answer": "It looks like your message came through empty. What would you like to talk about?"}


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


def cut(text, size):
    return [text[start:start + size] for start in range(0, len(text), size)]


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
        reasoning = [{"reasoning_content": piece, "reasoning": piece} for piece in cut(answer.reasoning, reply.piece)]
        tail = [{"content": piece} for piece in cut(answer.content or "", reply.piece)]
        for index, call in enumerate(answer.calls):
            function = call["function"]
            tail.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                         "function": {"name": function["name"], "arguments": ""}}]})
            tail += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                     for piece in cut(function["arguments"], reply.piece)]
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


def main():
    parser = argparse.ArgumentParser(description="Fake K2Think upstream for tests and benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--site", choices=sorted(SITES), default="k2horizon", help="which site to be")
    parser.add_argument("--api", action="store_true", help="be the official IFM API (api.ifm.ai/v1), not the site")
    parser.add_argument("--keys", help="with --api: the accepted keys, comma-separated (default: any key or none)")
    parser.add_argument("--refused", default="", help="with --api: keys answered 403, comma-separated")
    parser.add_argument("--self-hosted", action="store_true", help="with --api: be a vLLM/SGLang server instead")
    parser.add_argument("--blanking", action="store_true",
                        help="with --api: blank list content (no --chat-template-content-format string)")
    parser.add_argument("--empty-followups", action=argparse.BooleanOptionalAction, default=None,
                        help="with --api: low/medium follow-ups come back all reasoning (default: only self-hosted)")
    parser.add_argument("--daily-budget", type=int, default=DAILY_BUDGET, help="with --api: tokens a key has a day")
    args = parser.parse_args()
    if args.api:
        app = FakeIFM(keys=args.keys.split(",") if args.keys is not None else None,
                      refused=[key for key in args.refused.split(",") if key], self_hosted=args.self_hosted,
                      blanking=args.blanking, empty_followups=args.empty_followups,
                      daily_budget=args.daily_budget).app
    else:
        app = FakeK2Think(args.site).app
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
