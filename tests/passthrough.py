#!/usr/bin/env python3
"""The least a proxy on aiohttp can do, for the benchmark's floor: each chat completion's body and key sent on to
the upstream as they came, and its answer passed back byte for byte, with nothing read, checked or rendered.

Usage: python tests/passthrough.py --port PORT --upstream http://127.0.0.1:UPSTREAM_PORT/v1
"""

import argparse

from aiohttp import ClientSession, web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", ClientSession)
PASSED_HEADERS = ("Authorization", "Content-Type", "X-Session-ID")


async def open_session(app):
    app[SESSION] = ClientSession()
    yield
    await app[SESSION].close()


async def chat(request):
    """The request passed on; the answer passed back as it comes."""
    headers = {name: request.headers[name] for name in PASSED_HEADERS if name in request.headers}
    async with request.app[SESSION].post(request.app[UPSTREAM] + "/chat/completions", data=await request.read(),
                                         headers=headers) as answer:
        if answer.content_type != "text/event-stream":
            return web.Response(body=await answer.read(), status=answer.status, content_type=answer.content_type)
        response = web.StreamResponse(status=answer.status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for chunk in answer.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream
    app.cleanup_ctx.append(open_session)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
