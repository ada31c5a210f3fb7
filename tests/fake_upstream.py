"""A fake of the K2Think web service, built from shared/k2think-protocol.md.

It can answer in every variant the protocol page lists (snapshot or
incremental frames, each reasoning markup, JSON where a stream was asked,
noise, cut points, delays, drops, hangs, error statuses, per-token answers)
and records what it received. Tests drive it in-process; the benchmark and
end-to-end tests run it as a process (`python tests/fake_upstream.py --port N`)
and steer it through its /_fake/reply route.
"""

import argparse
import asyncio
import base64
import json
import time
from dataclasses import asdict, dataclass, field, fields

from aiohttp import web

MODEL = "MBZUAI-IFM/K2-Think"
AUTH_EXPIRED = {"detail": "Your session has expired or the token is invalid. Please sign in again."}
WRONG_PASSWORD = {"detail": "The email or password provided is incorrect. Please check for typos and try logging in again."}


def make_jwt(exp, account_id="0b7c2a5e-6a55-4b7e-9c43-5a0c4c1f6e21", signature="c2lnbmF0dXJl"):
    """An HS256-shaped JWT carrying `id` and `exp`, as K2Think issues (the signature is not checked here)."""
    def segment(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{segment({'alg': 'HS256', 'typ': 'JWT'})}.{segment({'id': account_id, 'exp': int(exp)})}.{signature}"


@dataclass
class Reply:
    """How the fake answers one chat request."""
    reasoning: str = "The user greets me. I should greet back."
    answer: str = "Hello! How can I help you today?"
    markup: str = "tags"          # tags | tags_no_answer | lone_think | details | plain
    style: str = "snapshot"       # snapshot | incremental
    form: str = "choices"         # choices (OpenAI delta) | content (top-level "content")
    opening: bool = False         # a first frame with an empty text, as OpenAI-style streams begin
    json_answer: bool = False     # one application/json document even though a stream was asked
    piece: int = 6                # characters the model adds per frame
    delay: float = 0.0            # seconds between frames
    first_delay: float = 0.0      # seconds before the response headers
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46})
    usage_alone: bool = True      # usage in a frame of its own, else in the last text frame
    finish_reason: str | None = None  # in the last text frame ("length", "content_filter"), choices form only
    end: str = "[DONE]"           # [DONE] | DONE | done | done_json | none
    noise: bool = True            # "-1" frames and SSE comments between frames
    crlf: bool = False            # \r\n line endings
    chunk_bytes: int = 0          # write the body in slices of this many bytes (cuts lines and UTF-8)
    drop_after: int = -1          # frames sent before the connection is cut
    hang_after: int = -1          # frames sent before going silent for good
    error_after: int = -1         # frames sent before an in-stream {"detail": ...} error frame
    garbage: bool = False         # undecodable frames among the good ones
    status: int = 200
    body: str = ""                # body of a non-200 answer
    headers: dict = field(default_factory=dict)
    content_type: str = ""        # overrides the answer's content type


def quoted(text):
    return "\n".join("> " + line for line in text.split("\n"))


def details_snapshot(reasoning, shown, answer_markup, answered):
    """Open WebUI's guest rendering: the reasoning block, rewritten when thinking ends."""
    if shown < len(reasoning) or not answered:
        return '<details type="reasoning" done="false">\n<summary>Thinking…</summary>\n' + quoted(reasoning[:shown])
    return ('<details type="reasoning" done="true" duration="2">\n<summary>Thought for 2 seconds</summary>\n'
            + quoted(reasoning) + "\n</details>\n" + answer_markup[:answered])


def full_text(reply):
    r, a = reply.reasoning, reply.answer
    return {
        "tags": f"<think>{r}</think>\n<answer>{a}</answer>",
        "tags_no_answer": f"<think>{r}</think>\n\n{a}",
        "lone_think": f"{r}\n</think>\n\n<answer>\n{a}\n</answer>",
        "plain": a,
        "details": details_snapshot(r, len(r), f"<answer>{a}</answer>", len(f"<answer>{a}</answer>")),
    }[reply.markup]


def snapshots(reply):
    """The whole text after each frame, as a snapshot-style upstream sends it."""
    if reply.markup != "details":
        text = full_text(reply)
        return [text[:end] for end in range(reply.piece, len(text) + reply.piece, reply.piece)] or [""]
    answer_markup = f"<answer>{reply.answer}</answer>"
    steps = [details_snapshot(reply.reasoning, shown, answer_markup, 0)
             for shown in range(0, len(reply.reasoning), reply.piece)]
    steps += [details_snapshot(reply.reasoning, len(reply.reasoning), answer_markup, answered)
              for answered in range(reply.piece, len(answer_markup) + reply.piece, reply.piece)]
    return steps


def texts(reply):
    """What each text frame carries: snapshots, or the pieces between them."""
    if reply.style == "snapshot":
        return snapshots(reply)
    text = full_text(reply)
    return [text[start:start + reply.piece] for start in range(0, len(text), reply.piece)]


def frame_payloads(reply):
    """The SSE payloads of one answer, in order."""
    payloads = []
    pieces = [""] * reply.opening + texts(reply)
    for number, text in enumerate(pieces):
        if reply.form == "content":
            obj = {"content": text}
        else:
            delta = {"content": text}
            if number == 0:
                delta = {"role": "assistant", **delta}
            last = number == len(pieces) - 1
            obj = {"choices": [{"index": 0, "delta": delta, "finish_reason": reply.finish_reason if last else None}]}
        if reply.usage and not reply.usage_alone and number == len(pieces) - 1:
            obj["usage"] = reply.usage
        payloads.append(json.dumps(obj, ensure_ascii=False))
    if reply.usage and reply.usage_alone:
        payloads.append(json.dumps({"usage": reply.usage}))
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
    return {"id": "chatcmpl-fake", "model": MODEL, "created": int(time.time()),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": full_text(reply)},
                         "finish_reason": "stop"}],
            "usage": reply.usage}


@dataclass
class Received:
    path: str
    headers: dict
    body: dict
    token: str


class FakeK2Think:
    """The fake service: set `reply`, `script` (one Reply per request, first in first out) or `by_token`."""

    def __init__(self):
        self.reply = Reply()
        self.script = []
        self.by_token = {}
        self.received = []
        self.models = [{"id": MODEL, "name": "K2-Think", "owned_by": "MBZUAI-IFM"}]
        self.models_bare = False           # answer the model list as a bare array
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
        reply = self.reply_for(token)
        if reply.first_delay:
            await asyncio.sleep(reply.first_delay)
        if request.path == "/api/chat/completions" and not token:
            return web.json_response(AUTH_EXPIRED, status=401)
        if reply.status != 200:
            return await self.send(request, reply, reply.body, reply.content_type or "application/json")
        if reply.json_answer:
            return await self.send(request, reply, json.dumps(json_document(reply)), "application/json")
        return await self.stream(request, reply)

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
            for number, event in enumerate(sse_events(reply)):
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

    async def set_reply(self, request):
        values = await request.json()
        known = {f.name for f in fields(Reply)}
        self.reply = Reply(**{k: v for k, v in values.items() if k in known})
        return web.json_response(asdict(self.reply))


def main():
    parser = argparse.ArgumentParser(description="Fake K2Think upstream for tests and benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    web.run_app(FakeK2Think().app, host=args.host, port=args.port, access_log=None, print=None,
                handler_cancellation=True)


if __name__ == "__main__":
    main()
