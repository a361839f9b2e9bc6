"""The simulator, request in, status and body out, over real HTTP on loopback."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import pytest

from batchkimi.simulator import SimHandle

KEY = "sk-sim-test-key-000000"


def post(h: SimHandle, body: Any, *, key: str | None = KEY, headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=30)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    try:
        conn.request("POST", "/v1/chat/completions", body=raw if raw is not None else json.dumps(body), headers=hdrs)
        resp = conn.getresponse()
        try:
            data = resp.read()
        except http.client.IncompleteRead as exc:
            data = exc.partial
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def get(h: SimHandle, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
    return json.loads(conn.getresponse().read())


def user(text: str, **kw: Any) -> dict[str, Any]:
    return {"model": "kimi-k2.6", "messages": [{"role": "user", "content": text}], **kw}


def events(data: bytes) -> list[Any]:
    out = []
    for block in data.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


REJECTIONS = [
    pytest.param(user("hi", temperature=0.7), 400, "invalid temperature: only 1 is allowed for this model", id="temperature-thinking"),
    pytest.param(user("hi", temperature=0.7, thinking={"type": "disabled"}), 400, "invalid temperature: only 0.6 is allowed for this model", id="temperature-no-thinking"),
    pytest.param(user("hi", top_p=0.9), 400, "invalid top_p: only 0.95 is allowed for this model", id="top_p"),
    pytest.param(user("hi", n=2), 400, "invalid n: only 1 is allowed for this model", id="n"),
    pytest.param(user("hi", presence_penalty=0.5), 400, "invalid presence_penalty: only 0 is allowed for this model", id="presence"),
    pytest.param(user("hi", frequency_penalty=0.5), 400, "invalid frequency_penalty: only 0 is allowed for this model", id="frequency"),
    pytest.param(user("hi", tool_choice="required", tools=[{"type": "function", "function": {"name": "f"}}]), 400,
                 "tool_choice 'required' is incompatible with thinking enabled", id="tool-choice-required"),
    pytest.param(user("hi", tool_choice={"type": "function", "function": {"name": "f"}}, tools=[{"type": "function", "function": {"name": "f"}}]), 400,
                 "tool_choice 'specified' is incompatible with thinking enabled", id="tool-choice-named"),
    pytest.param({"model": "kimi-k2.6", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.w:0", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "functions.w:0", "content": "sunny"}]}, 400,
        "thinking is enabled but reasoning_content is missing in assistant tool call message at index 1", id="reasoning-missing"),
    pytest.param(user("x" * 100, max_tokens=262144), 400, "Your request exceeded model token limit : 262144", id="context-limit"),
    pytest.param({"model": "kimi-k2.6", "messages": [{"role": "user", "content": ""}]}, 400, "must not be empty", id="empty-content"),
    pytest.param({"model": "kimi-k2.5", "messages": [{"role": "user", "content": [{"type": "text", "text": "describe"},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]}, 400, "does not support video", id="video-on-k2.5"),
    pytest.param({"model": "kimi-k9", "messages": [{"role": "user", "content": "hi"}]}, 404, "Not found the model kimi-k9", id="unknown-model"),
    pytest.param({"messages": [{"role": "user", "content": "hi"}]}, 400, "model is required", id="no-model"),
    pytest.param(user("hi", stop=["a", "b", "c", "d", "e", "f"]), 400, "at most 5", id="stop-too-many"),
]


@pytest.mark.parametrize("body,status,message", REJECTIONS)
def test_kimi_request_rules(simulator, body: dict[str, Any], status: int, message: str) -> None:
    """Kimi's 400s with the exact messages of tokenhub-api.md §3.2, in TokenHub's envelope."""
    h = simulator()
    code, _, data = post(h, body)
    err = json.loads(data)["error"]
    assert code == status
    assert message in err["message"]
    assert err["request_id"] and err["source"] in ("client", "gateway", "upstream")


def test_allowed_fixed_values_are_accepted(simulator) -> None:
    h = simulator()
    code, _, _ = post(h, user("hi", temperature=1.0, top_p=0.95, n=1, presence_penalty=0, frequency_penalty=0))
    assert code == 200
    code, _, _ = post(h, user("hi", temperature=0.6, thinking={"type": "disabled"}))
    assert code == 200


def test_auth_missing_or_wrong_key_gets_401_envelope(simulator) -> None:
    h = simulator(api_keys=[KEY])
    for key in (None, "sk-wrong"):
        code, _, data = post(h, user("hi"), key=key)
        assert code == 401
        assert json.loads(data)["error"] == {**json.loads(data)["error"], "type": "authentication_error", "code": "401002", "message": "invalid api key"}


def test_moonshot_error_style_has_only_type_and_message(simulator) -> None:
    h = simulator(error_style="moonshot")
    code, _, data = post(h, user("hi", top_p=0.5))
    assert code == 400 and json.loads(data) == {"error": {"message": "invalid top_p: only 0.95 is allowed for this model", "type": "invalid_request_error"}}


def test_unknown_model_as_tokenhub_400_when_configured(simulator) -> None:
    h = simulator(unknown_model_status=400)
    code, _, data = post(h, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert code == 400 and json.loads(data)["error"]["code"] == "400002"


def test_key_model_allow_list_gives_403(simulator) -> None:
    h = simulator(key_models={KEY: ["kimi-k2.5"]})
    code, _, data = post(h, user("hi"))
    assert code == 403 and json.loads(data)["error"]["type"] == "permission_error"


def test_body_over_the_limit_and_malformed_json(simulator) -> None:
    h = simulator(max_body_bytes=1000)
    code, _, _ = post(h, user("x" * 5000))
    assert code == 413
    code, _, data = post(h, None, raw=b"{not json")
    assert code == 400 and "not valid JSON" in json.loads(data)["error"]["message"]


def test_non_streaming_answer_shape_reasoning_and_usage(simulator) -> None:
    h = simulator()
    code, headers, data = post(h, user("Label this review as one of: positive, negative, neutral.\n\nI love it, great value"))
    body = json.loads(data)
    assert code == 200 and body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    msg = body["choices"][0]["message"]
    assert msg["content"] == "positive" and msg["reasoning_content"]
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["cached_tokens"] == u["prompt_tokens_details"]["cached_tokens"]
    assert headers["x-request-id"]


def test_answers_depend_on_the_prompt_and_are_deterministic(simulator) -> None:
    h = simulator(accuracy=1.0)
    answers = {}
    for q, expected in (("What is 17 + 25?", "42"), ("What is 9 * 8?", "72"), ("What is 50 - 8?", "42")):
        _, _, data = post(h, user(q, thinking={"type": "disabled"}))
        answers[q] = json.loads(data)["choices"][0]["message"]["content"]
        assert expected in answers[q]
        assert "reasoning_content" not in json.loads(data)["choices"][0]["message"]
    _, _, again = post(h, user("What is 17 + 25?", thinking={"type": "disabled"}))
    assert json.loads(again)["choices"][0]["message"]["content"] == answers["What is 17 + 25?"]


def test_json_mode_returns_json(simulator) -> None:
    h = simulator(accuracy=1.0)
    _, _, data = post(h, user("What is 2 + 3?", response_format={"type": "json_object"}))
    assert json.loads(json.loads(data)["choices"][0]["message"]["content"]) == {"answer": "5"}


def test_stream_shape_like_kimi(simulator) -> None:
    """Role chunk, reasoning deltas, then content deltas, finish chunk with choices[0].usage, [DONE]."""
    h = simulator()
    code, headers, data = post(h, user("Tell me about rivers", stream=True))
    assert code == 200 and headers["content-type"].startswith("text/event-stream")
    evs = events(data)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    kinds = ["r" if "reasoning_content" in c["choices"][0]["delta"] else "c" if "content" in c["choices"][0]["delta"] else "-" for c in chunks[1:]]
    assert "r" in kinds and "c" in kinds and kinds.index("c") > max(i for i, k in enumerate(kinds) if k == "r")
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["usage"]["total_tokens"] > 0
    assert "usage" not in chunks[-1]


def test_stream_include_usage_adds_a_choices_empty_chunk(simulator) -> None:
    h = simulator()
    _, _, data = post(h, user("hi", stream=True, stream_options={"include_usage": True}))
    evs = events(data)
    assert evs[-2]["choices"] == [] and evs[-2]["usage"]["total_tokens"] > 0
    assert all(e["usage"] is None for e in evs[:-2])


def test_stream_tool_call_deltas(simulator) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]
    h = simulator()
    _, _, data = post(h, user("What's the weather in Beijing?", stream=True, tools=tools))
    evs = events(data)[:-1]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in evs if "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["id"] == "functions.get_weather:0" and calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0
    assert all("id" not in c and c["index"] == 0 for c in calls[1:])
    args = json.loads("".join(c["function"]["arguments"] for c in calls))
    assert args == {"city": "Beijing"}
    assert evs[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_bad_tool_args_rate_breaks_the_schema(simulator) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
    h = simulator(bad_tool_args_rate=1.0)
    _, _, data = post(h, user("call f", tools=tools))
    args = json.loads(data)["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(args)


def test_small_budget_gives_length_with_empty_content(simulator) -> None:
    h = simulator(reasoning_words=200)
    _, _, data = post(h, user("Explain tides", max_tokens=20))
    body = json.loads(data)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == ""
    assert body["usage"]["completion_tokens"] == 20


def test_repeated_prefix_is_reported_as_cached(simulator) -> None:
    h = simulator()
    system = {"role": "system", "content": "You are a careful labeller. " * 40}
    first = json.loads(post(h, {"model": "kimi-k2.6", "messages": [system, {"role": "user", "content": "a"}]})[2])
    second = json.loads(post(h, {"model": "kimi-k2.6", "messages": [system, {"role": "user", "content": "b"}]})[2])
    assert first["usage"]["cached_tokens"] == 0
    assert 0 < second["usage"]["cached_tokens"] < second["usage"]["prompt_tokens"]


@pytest.mark.parametrize("retry_after,header", [("seconds", True), ("none", False)])
def test_rpm_limit_gives_tokenhub_429_with_or_without_retry_after(simulator, retry_after: str, header: bool) -> None:
    h = simulator(rpm=2, retry_after=retry_after)
    codes = [post(h, user(f"q{i}"))[0] for i in range(2)]
    code, headers, data = post(h, user("q3"))
    assert codes == [200, 200] and code == 429
    assert json.loads(data)["error"] == {**json.loads(data)["error"], "type": "rate_limit_error", "code": "429001",
                                         "message": "rate limit exceeded on dimension: rpm"}
    assert ("retry-after" in headers) is header


def test_retry_after_as_http_date(simulator) -> None:
    h = simulator(rpm=1, retry_after="date")
    post(h, user("a"))
    _, headers, _ = post(h, user("b"))
    assert headers["retry-after"].endswith("GMT")


def test_moonshot_rate_limit_message_says_try_again_after(simulator) -> None:
    h = simulator(rpm=1, rate_limit_style="moonshot", error_style="moonshot")
    post(h, user("a"))
    code, _, data = post(h, user("b"))
    err = json.loads(data)["error"]
    assert code == 429 and err["type"] == "rate_limit_reached_error" and "please try again after" in err["message"]


def test_tpm_limit(simulator) -> None:
    """A window spent is a 429 that a wait cures; a prompt alone over the limit is a 400: no wait would."""
    h = simulator(tpm=60)
    assert post(h, user("short"))[0] == 200
    code, _, data = post(h, user("word " * 40))
    assert code == 429 and "tpm" in json.loads(data)["error"]["message"]
    code, _, data = post(h, user("word " * 200))
    assert code == 400 and "can never be served" in json.loads(data)["error"]["message"]


FAULTS = [
    pytest.param("500", 500, "unexpected_output", id="500"),
    pytest.param("502", 502, "upstream_error", id="502"),
    pytest.param("503", 503, "service_unavailable", id="503"),
    pytest.param("504", 504, "gateway_timeout", id="504"),
    pytest.param("overload", 429, "engine_overloaded_error", id="overload"),
    pytest.param("402", 402, "permission_error", id="402"),
    pytest.param("451", 451, "content_filter_error", id="451"),
]


@pytest.mark.parametrize("fault,status,etype", FAULTS)
def test_faults_by_marker(simulator, fault: str, status: int, etype: str) -> None:
    h = simulator()
    code, headers, data = post(h, user(f"hello [[sim:{fault}]]"))
    err = json.loads(data)["error"]
    assert code == status and etype in (err["type"], err.get("upstream_code"))
    if fault == "overload":
        assert "retry-after" not in headers


def test_fault_by_header_and_html_gateway_page(simulator) -> None:
    h = simulator()
    code, headers, data = post(h, user("hello"), headers={"X-Sim-Fault": "html"})
    assert code == 502 and headers["content-type"].startswith("text/html") and b"Bad Gateway" in data


def test_fault_for_the_first_n_attempts_only(simulator) -> None:
    h = simulator()
    codes = [post(h, user("flaky [[sim:503*2]]"))[0] for _ in range(3)]
    assert codes == [503, 503, 200]


def test_stream_cut_and_no_done_and_error_event(simulator) -> None:
    h = simulator()
    _, _, cut = post(h, user("x [[sim:cut]]", stream=True))
    assert b"[DONE]" not in cut
    _, _, nodone = post(h, user("x [[sim:nodone]]", stream=True))
    assert b'"finish_reason":"stop"' in nodone and b"[DONE]" not in nodone
    _, _, errev = post(h, user("x [[sim:error_event]]", stream=True))
    assert b'"error"' in errev and b"[DONE]" not in errev


def test_random_fail_rate_is_reproducible_with_a_seed(simulator) -> None:
    def codes(seed: int) -> list[int]:
        h = simulator(fail_rate=0.5, seed=seed, fail_faults=["500", "503"])
        return [post(h, user(f"q{i}"))[0] for i in range(20)]

    a, b = codes(3), codes(3)
    assert a == b and 200 in a and any(c >= 500 for c in a)


def test_stats_and_models(simulator) -> None:
    h = simulator(rpm=1)
    post(h, user("a"))
    post(h, user("b"))
    s = get(h, "/stats")
    assert s["requests"] == 2 and s["by_status"] == {"200": 1, "429": 1}
    assert s["peak_in_flight"] >= 1 and s["prompt_tokens"] > 0
    assert list(s["per_key"].values())[0]["rate_limited"] == 1
    models = get(h, "/v1/models")
    assert {m["id"]: m["supports_video_in"] for m in models["data"]} == {"kimi-k2.6": True, "kimi-k2.5": False}


def test_streaming_pace_and_latency(simulator) -> None:
    h = simulator(latency_ms=200, tokens_per_s=2000)
    t0 = time.monotonic()
    code, _, _ = post(h, user("pace", stream=True))
    assert code == 200 and time.monotonic() - t0 >= 0.2


# ---- a rehearsal must not lie: fields of the wrong type, faults a client must handle ----

WRONG_TYPES = [
    pytest.param(user("hi", temperature="hot"), "temperature must be a number", id="temperature-text"),
    pytest.param(user("hi", response_format="json"), "response_format must be an object", id="response-format-text"),
    pytest.param(user("hi", stream=True, stream_options="x"), "stream_options must be an object", id="stream-options-text"),
    pytest.param({"model": ["kimi-k2.6"], "messages": [{"role": "user", "content": "hi"}]}, "model must be a string", id="model-list"),
    pytest.param(user("hi", thinking="disabled"), "thinking must be an object", id="thinking-bare-string"),
    pytest.param(user("hi", max_tokens=0), "max_tokens must be a positive integer", id="max-tokens-zero"),
    pytest.param(user("hi", max_tokens=True), "max_tokens must be a positive integer", id="max-tokens-bool"),
    pytest.param(user("hi", tools="f"), "tools must be an array", id="tools-text"),
    pytest.param(user("hi", stop=5), "stop must be a string or an array", id="stop-number"),
    pytest.param({"model": "kimi-k2.6", "messages": [{"role": "user", "content": 5}]}, "content must be a string", id="content-number"),
]


@pytest.mark.parametrize("error_style", ["tokenhub", "moonshot"])
@pytest.mark.parametrize("body,message", WRONG_TYPES)
def test_a_field_of_the_wrong_type_is_a_json_400_in_the_chosen_envelope(simulator, body: Any, message: str, error_style: str) -> None:
    h = simulator(error_style=error_style)
    code, headers, data = post(h, body)
    assert code == 400 and headers["content-type"].startswith("application/json")
    err = json.loads(data)["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    assert ("request_id" in err) == (error_style == "tokenhub")


def test_max_completion_tokens_wins_over_max_tokens(simulator) -> None:
    h = simulator(reasoning_words=400)
    code, _, data = post(h, user("hi", max_tokens=32768, max_completion_tokens=8))
    assert code == 200 and json.loads(data)["choices"][0]["finish_reason"] == "length"


MORE_FAULTS = [
    pytest.param("quota", 429, "exceeded_current_quota_error", "token quota", id="moonshot-quota"),
    pytest.param("suspended", 429, "exceeded_current_quota_error", "is suspended", id="moonshot-suspended"),
    pytest.param("content_filter", 400, "content_filter", "considered high risk", id="moonshot-content-filter"),
    pytest.param("too_long", 400, "invalid_request_error", "Input token length too long", id="input-too-long"),
    pytest.param("tpd", 429, "rate_limit_reached_error", "TPD rate limit", id="tpd"),
]


@pytest.mark.parametrize("fault,status,etype,words", MORE_FAULTS)
def test_moonshot_native_faults(simulator, fault: str, status: int, etype: str, words: str) -> None:
    h = simulator(error_style="moonshot")
    code, headers, data = post(h, user(f"hello [[sim:{fault}]]"))
    assert code == status and json.loads(data) == {"error": {"type": etype, "message": json.loads(data)["error"]["message"]}}
    assert words in json.loads(data)["error"]["message"]
    if fault == "tpd":
        assert headers["retry-after"] == "1152"


def test_tokenhub_500_and_502_bodies_follow_its_envelope(simulator) -> None:
    h = simulator()
    _, _, data = post(h, user("x [[sim:502]]"))
    assert json.loads(data)["error"] | {"request_id": "-"} == {
        "type": "upstream_error", "code": "502001", "message": "provider error", "source": "upstream",
        "upstream_status": 500, "upstream_code": "unexpected_output", "request_id": "-"}
    _, _, data = post(h, user("x [[sim:500]]"))
    err = json.loads(data)["error"]
    assert (err["type"], err["source"], err["upstream_status"], err["message"]) == ("unexpected_output", "upstream", 500, "invalid state transition")


def test_nodone_ends_the_body_cleanly_without_done(simulator) -> None:
    """A clean end of stream (the body complete, no reset) without [DONE]: still not a whole answer."""
    h = simulator()
    conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(user("x [[sim:nodone]]", stream=True)),
                 headers={"Authorization": f"Bearer {KEY}"})
    data = conn.getresponse().read()  # raises IncompleteRead if the connection was cut
    assert data.endswith(b"\n\n") and b'"finish_reason":"stop"' in data and b"[DONE]" not in data


def test_parallel_tools_gives_several_calls_in_one_answer(simulator) -> None:
    h = simulator()
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
             for n in ("get_weather", "get_time")]
    _, _, data = post(h, user("Paris [[sim:parallel_tools]]", tools=tools, stream=True))
    calls = [c for e in events(data) if isinstance(e, dict) and e["choices"] for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert {c["index"] for c in calls} == {0, 1} and {c["function"]["name"] for c in calls if "id" in c} == {"get_weather", "get_time"}


def test_estimate_token_count_endpoint(simulator) -> None:
    h = simulator()
    conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=10)
    body = {"model": "kimi-k2.6", "messages": [{"role": "user", "content": "word " * 40}]}
    conn.request("POST", "/v1/tokenizers/estimate-token-count", body=json.dumps(body), headers={"Authorization": f"Bearer {KEY}"})
    estimated = json.loads(conn.getresponse().read())["data"]["total_tokens"]
    _, _, data = post(h, {**body, "thinking": {"type": "disabled"}})
    assert estimated == json.loads(data)["usage"]["prompt_tokens"]
    conn.request("POST", "/v1/tokenizers/estimate-token-count", body=json.dumps({"model": "gpt-x", "messages": []}),
                 headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 404 and "error" in json.loads(resp.read())
    off = simulator(estimate_endpoint=False, models_endpoint=False)
    for method, path in (("POST", "/v1/tokenizers/estimate-token-count"), ("GET", "/v1/models")):
        conn = http.client.HTTPConnection("127.0.0.1", off.port, timeout=10)
        conn.request(method, path, body=json.dumps(body), headers={"Authorization": f"Bearer {KEY}"})
        assert conn.getresponse().status == 404  # TokenHub documents neither: a rehearsal can leave them out


def test_stats_count_streams_per_key_and_connections(simulator) -> None:
    h = simulator()
    for _ in range(3):
        post(h, user("a", stream=True))
    s = get(h, "/stats")
    assert list(s["per_key"].values())[0]["ok"] == 3
    assert s["connections"] == 3  # http.client opens one per request here


def test_a_client_disconnecting_mid_stream_logs_no_traceback(simulator, caplog) -> None:
    import socket

    h = simulator(tokens_per_s=50)
    with caplog.at_level("DEBUG"):
        s = socket.create_connection(("127.0.0.1", h.port))
        body = json.dumps(user("tell me a long story", stream=True)).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        s.recv(100)
        s.close()
        time.sleep(1.0)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
