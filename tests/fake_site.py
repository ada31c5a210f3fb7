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
"""

import asyncio
import base64
import html
import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace

from aiohttp import web
from fake_model import EFFORTS, EMPTY_PROMPT_REPLY, MODEL, THINKING_FIELDS, pieces_of

OLD_MODEL = "MBZUAI-IFM/K2-Think"
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
        self.sent_bytes = 0                # of answers, written so far
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
        unknown model and a system message after the first (K2's template); the 2026 site also the
        chat_id/id/session_id trio (its HTTP answer is then a bare task_id), an assistant turn without a thinking
        field, and an effort its template does not know."""
        served = [m.get("id") for m in self.models] if isinstance(self.models, list) else [SITES[self.site][0]["id"]]
        if not isinstance(body, dict) or body.get("model") not in served:
            return web.json_response(MODEL_NOT_FOUND, status=400)
        if any(isinstance(m, dict) and m.get("role") == "system" for m in (body.get("messages") or [])[1:]):
            return web.json_response({"detail": "A system message comes only first in K2's chat template"},
                                     status=400)
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

    async def write(self, response, reply, text):
        data = text.encode()
        size = reply.chunk_bytes or max(len(data), 1)
        for start in range(0, len(data), size):
            await response.write(data[start:start + size])
            self.sent_bytes += min(size, len(data) - start)
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
