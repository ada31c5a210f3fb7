"""The OpenAI surface: keys, bad input, models, health, CORS, unknown routes (with the route meant), the routes
the root lists, structured output."""

import json

import pytest
from conftest import API_KEY, AUTH, MODEL, chat, read_sse
from fake_site import Reply

import k2proxy


def assert_error(body, status_code, response_status):
    assert response_status == status_code
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": "Basic " + API_KEY}])
async def test_wrong_or_missing_key_is_401(proxy, headers):
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        response = await proxy.request(method, path, json=chat(), headers=headers)
        body = await response.json()
        assert_error(body, 401, response.status)
        assert body["error"]["type"] == "authentication_error"


async def test_several_api_keys(make_proxy, fake):
    proxy = await make_proxy(VALID_API_KEY="sk-one, sk-two")
    for key in ("sk-one", "sk-two"):
        assert (await proxy.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status == 200


@pytest.mark.parametrize("data,param,fragment", [
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe{}", None, "UTF-8"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", '
     b'"messages": [{"role": "user", "content": "a\\ud800b"}]}', None, "surrogate"),
    (b"[1, 2]", None, "JSON object"),
    (b'"text"', None, "JSON object"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B"}', "messages", "messages"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "messages": []}', "messages", "non-empty"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "messages": "hi"}', "messages", "list"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "messages": ["hi"]}', "messages[0]", "object"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "messages": [{"content": "hi"}]}', "messages[0].role", "role"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "messages": [{"role": "wizard", "content": "hi"}]}',
     "messages[0].role", "role"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "messages": [{"role": "user", "content": 5}]}',
     "messages[0].content", "string"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "model", "model"),
    (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', "model", "model"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "stream": "yes", '
     b'"messages": [{"role": "user", "content": "hi"}]}', "stream", "stream"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "n": 2, '
     b'"messages": [{"role": "user", "content": "hi"}]}', "n", "n=1"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "temperature": "hot", '
     b'"messages": [{"role": "user", "content": "hi"}]}', "temperature", "temperature"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "max_tokens": -1, '
     b'"messages": [{"role": "user", "content": "hi"}]}', "max_tokens", "max_tokens"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "stop": [1], '
     b'"messages": [{"role": "user", "content": "hi"}]}', "stop", "stop"),
    (b'{"model": "IFM/K2-Horizon-375B-A23B", "stream_options": 3, '
     b'"messages": [{"role": "user", "content": "hi"}]}', "stream_options", "stream_options"),
])
async def test_bad_body_is_400_naming_the_problem(proxy, fake, data, param, fragment):
    response = await proxy.post("/v1/chat/completions", data=data,
                                headers={**AUTH, "Content-Type": "application/json"})
    body = await response.json()
    assert_error(body, 400, response.status)
    assert body["error"]["param"] == param
    assert fragment in body["error"]["message"]
    assert fake.received == []


async def test_body_over_the_limit_is_413(make_proxy):
    proxy = await make_proxy(MAX_REQUEST_MB="0.01")
    response = await proxy.post("/v1/chat/completions", json=chat("x" * 20000), headers=AUTH)
    body = await response.json()
    assert_error(body, 413, response.status)
    assert "MAX_REQUEST_MB" in body["error"]["message"]


async def test_unknown_model_is_404(proxy, fake):
    response = await proxy.post("/v1/chat/completions", json=chat(model="gpt-4"), headers=AUTH)
    body = await response.json()
    assert_error(body, 404, response.status)
    assert body["error"]["code"] == "model_not_found" and "IFM/K2-Horizon-375B-A23B" in body["error"]["message"]
    assert fake.received == []


async def test_models_list_and_single_model(make_proxy):
    proxy = await make_proxy(MODELS="IFM/K2-Horizon-375B-A23B,IFM/K2-Horizon-375B-A23B-v2")
    body = await (await proxy.get("/v1/models", headers=AUTH)).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [
        "IFM/K2-Horizon-375B-A23B", "IFM/K2-Horizon-375B-A23B-nothink", "k2-horizon-375b-a23b",
        "k2-horizon-375b-a23b-nothink", "IFM/K2-Horizon-375B-A23B-v2", "IFM/K2-Horizon-375B-A23B-v2-nothink",
        "k2-horizon-375b-a23b-v2", "k2-horizon-375b-a23b-v2-nothink"]
    assert {m["context_length"] for m in body["data"]} == {512 * 1024}
    assert all(m["object"] == "model" and m["owned_by"] for m in body["data"])
    one = await (await proxy.get("/v1/models/IFM/K2-Horizon-375B-A23B-v2-nothink", headers=AUTH)).json()
    assert one["id"] == "IFM/K2-Horizon-375B-A23B-v2-nothink"
    missing = await proxy.get("/v1/models/gpt-4", headers=AUTH)
    assert missing.status == 404


async def test_the_slash_free_id_serves_chat_and_responses_like_the_full_one(proxy, fake):
    """Clients that read "IFM/" as a provider prefix (the OpenAI Agents SDK) ask for the short id instead."""
    chat_answer = await (await proxy.post("/v1/chat/completions", json=chat(model="k2-horizon-375b-a23b"),
                                          headers=AUTH)).json()
    response = await (await proxy.post("/v1/responses", json={"model": "k2-horizon-375b-a23b", "input": "Hi"},
                                       headers=AUTH)).json()
    assert chat_answer["model"] == response["model"] == "k2-horizon-375b-a23b"
    assert chat_answer["choices"][0]["message"]["content"] == fake.reply.answer
    assert response["output"][-1]["content"][0]["text"] == fake.reply.answer
    assert [r.body["model"] for r in fake.received] == [MODEL, MODEL]


async def test_health_and_index_are_public_and_hold_no_secrets(proxy):
    for path in ("/health", "/"):
        response = await proxy.get(path)
        text = await response.text()
        assert response.status == 200 and response.content_type == "application/json"
        assert API_KEY not in text and "admin-test-key" not in text
    health = await (await proxy.get("/health")).json()
    assert health["status"] == "ok" and health["mode"] == "guest" and "total" in health["tokens"]


@pytest.mark.parametrize("method,path,status", [("GET", "/nope", 404), ("GET", "/v1/nothing", 404),
                                                ("DELETE", "/v1/chat/completions", 405),
                                                ("GET", "/v1/chat/completions", 405)])
async def test_unknown_routes_and_methods_get_json_errors(proxy, method, path, status):
    response = await proxy.request(method, path, headers=AUTH)
    assert_error(await response.json(), status, response.status)


@pytest.mark.parametrize("path,meant,advice", [
    ("/chat/completions", "POST /v1/chat/completions", "Put /v1 at the end of the client's base URL"),
    ("/v1/v1/messages", "POST /v1/messages", "remove /v1 from the base URL"),
    ("/v1/completions", "POST /v1/chat/completions", ""),
    ("/v1/message", "POST /v1/messages", ""),
])
async def test_an_unknown_route_names_the_route_meant(proxy, fake, path, meant, advice):
    response = await proxy.post(path, json=chat(), headers=AUTH)
    body = await response.json()
    message = body["error"]["message"]
    assert response.status == 404 and f"did you mean {meant}?" in message and advice in message
    assert fake.received == []


async def test_an_anthropic_client_with_v1_twice_gets_its_own_error_shape_and_the_hint(proxy):
    response = await proxy.post("/v1/v1/messages", json={}, headers=AUTH)
    body = await response.json()
    assert response.status == 404 and body["type"] == "error"
    assert "did you mean POST /v1/messages?" in body["error"]["message"]


async def test_a_path_like_no_route_gets_no_guess(proxy):
    body = await (await proxy.post("/nothing/here", json={}, headers=AUTH)).json()
    assert body["error"]["message"] == "Unknown route: POST /nothing/here"


async def test_the_root_lists_every_api_route(proxy):
    """As a user names them: /v1/models/{id}, not aiohttp's pattern of the route."""
    listed = (await (await proxy.get("/")).json())["endpoints"]
    api_routes = [f"{route.method} {route.shown_path or route.path}" for route in k2proxy.ROUTES
                  if route.auth is k2proxy.Auth.API]
    assert set(api_routes) <= set(listed) and "GET /v1/responses/{id}" in listed and "GET /v1/models/{id}" in listed
    assert not any(":" in endpoint for endpoint in listed)


async def test_cors_preflight_and_headers(make_proxy):
    proxy = await make_proxy(CORS_ORIGINS="https://chat.example")
    preflight = await proxy.options("/v1/chat/completions", headers={
        "Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
    response = await proxy.get("/v1/models", headers={**AUTH, "Origin": "https://chat.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    other = await proxy.get("/v1/models", headers={**AUTH, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    refused = await proxy.options("/v1/models", headers={"Origin": "https://evil.example"})
    assert refused.status == 403


async def test_cors_allows_any_origin_by_default(proxy):
    response = await proxy.get("/v1/models", headers={**AUTH, "Origin": "https://any.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_one_log_line_per_request_without_secrets(proxy, fake, caplog):
    caplog.set_level("INFO", logger="k2proxy")
    await (await proxy.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)).read()  # to its end
    await proxy.get("/health")  # on the same connection, served once the stream's handler (and its log) is done
    lines = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
    assert len(lines) == 1
    assert "model=IFM/K2-Horizon-375B-A23B" in lines[0] and "stream=true" in lines[0] and "status=200" in lines[0]
    assert "ttfb=" in lines[0] and "total=" in lines[0]
    assert API_KEY not in caplog.text


async def test_escaped_surrogate_pairs_are_text(proxy, fake):
    data = b'{"model": "IFM/K2-Horizon-375B-A23B", "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}'
    response = await proxy.post("/v1/chat/completions", data=data, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status == 200
    assert fake.received[0].body["messages"][-1]["content"] == "smile \U0001F600"


async def test_health_is_degraded_with_a_503_when_no_request_could_be_served(make_proxy, tmp_path):
    proxy = await make_proxy(PROXY_MODE="user")
    response = await proxy.get("/health")
    body = await response.json()
    assert response.status == 503 and body["status"] == "degraded" and "tokens.txt" in body["reason"]
    guest = await make_proxy()
    assert (await guest.get("/health")).status == 200


async def test_client_errors_and_upstream_failures_are_counted_apart_with_their_reasons(make_proxy, fake, caplog):
    caplog.set_level("INFO", logger="k2proxy")
    proxy = await make_proxy(MAX_RETRIES=0)
    await proxy.post("/v1/chat/completions", json=chat(model="gpt-4"), headers=AUTH)
    await proxy.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer wrong"})
    fake.reply = Reply(status=500, body="down")
    await proxy.post("/v1/chat/completions", json=chat(), headers=AUTH)
    admin_status = await proxy.get("/admin/status", headers={"Authorization": "Bearer admin-test-key"})
    stats = (await admin_status.json())["stats"]
    assert (stats["requests"], stats["client_errors"], stats["upstream_failures"], stats["errors"]) == (3, 2, 1, 3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST /v1/chat")]
    assert "model=gpt-4" in lines[0] and "status=404 (model_not_found)" in lines[0]
    assert "status=401 (invalid_api_key)" in lines[1] and "status=502 (upstream_error)" in lines[2]


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("frames", [{}, {"realtime_save": True}, {"batch": 2}],
                         ids=["snapshots", "realtime", "batched"])
async def test_response_format_asks_for_json_and_takes_it_out_of_the_answer(proxy, fake, stream, frames):
    fake.reply = Reply(reasoning="They want JSON.", answer='Sure:\n```json\n{"city": "Paris"}\n```\nAnything else?',
                       **frames)
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
    response = await proxy.post("/v1/chat/completions", json=chat(stream=stream, response_format=response_format),
                                headers=AUTH)
    if stream:
        events, _ = await read_sse(response)
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices"))
    else:
        content = (await response.json())["choices"][0]["message"]["content"]
    assert json.loads(content) == {"city": "Paris"}
    system = fake.received[0].body["messages"][0]
    assert system["role"] == "system" and "one JSON object" in system["content"]
    assert '"required": ["city"]' in system["content"]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_without_the_json_asked_for_is_a_502(proxy, fake, stream):
    fake.reply = Reply(answer="I would rather not use JSON today.")
    response = await proxy.post("/v1/chat/completions",
                                json=chat(stream=stream, response_format={"type": "json_object"}), headers=AUTH)
    if stream:
        events, _ = await read_sse(response)
        assert events[-2]["error"]["code"] == "invalid_json_output"
    else:
        assert response.status == 502 and (await response.json())["error"]["code"] == "invalid_json_output"


async def test_an_answer_nested_too_deeply_for_json_ends_the_stream_with_its_error(proxy, fake):
    fake.reply = Reply(answer="[" * 5000 + "]" * 5000)
    body = chat(stream=True, response_format={"type": "json_object"})
    events, _ = await read_sse(await proxy.post("/v1/chat/completions", json=body, headers=AUTH))
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "invalid_json_output"


@pytest.mark.parametrize("extra,param", [({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
                                         ({"response_format": {"type": "xml"}}, "response_format.type"),
                                         ({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
                                          "response_format.json_schema.schema")])
async def test_unsupported_openai_parameters_are_a_400_naming_them(proxy, fake, extra, param):
    response = await proxy.post("/v1/chat/completions", json=chat(**extra), headers=AUTH)
    error = (await response.json())["error"]
    assert response.status == 400 and error["param"] == param and fake.received == []


async def test_parameters_that_change_nothing_here_are_accepted(proxy, fake):
    extra = {"logprobs": False, "presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 7, "user": "u",
             "logit_bias": {"50256": -100}, "parallel_tool_calls": True, "service_tier": "auto", "metadata": {}}
    assert (await proxy.post("/v1/chat/completions", json=chat(**extra), headers=AUTH)).status == 200


async def test_a_preflight_allows_the_headers_the_api_reads_not_whatever_it_is_asked(make_proxy):
    proxy = await make_proxy(CORS_ORIGINS="https://chat.example")
    asked = "authorization, x-stainless-os, anthropic-version, x-evil-header, cookie, content-type"
    preflight = await proxy.options("/v1/messages", headers={
        "Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": asked})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Headers"] == (
        "authorization, x-stainless-os, anthropic-version, content-type")


@pytest.mark.parametrize("path,body", [
    ("/v1/responses", {"model": MODEL, "input": "Hi", "temperature": 1e400}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "top_p": -1e999}),
    ("/v1/responses", {"model": MODEL, "input": "Hi", "metadata": {"n": 1e400}}),
])
async def test_a_number_beyond_a_float_is_a_400_never_infinity(proxy, fake, path, body):
    raw = json.dumps(body).replace("Infinity", "1e400")  # what a client writes; Python would read it as infinity
    response = await proxy.post(path, data=raw, headers={**AUTH, "Content-Type": "application/json"})
    error = (await response.json())["error"]
    assert response.status == 400 and error["code"] == "invalid_json" and "1e400" in error["message"]
    assert not fake.received
