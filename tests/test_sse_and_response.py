"""The pure parsers: SSE framing at every chunk boundary, answers, usage, tool calls, errors."""

from __future__ import annotations

import json

import pytest

from batchkimi.errors import APIError, ResponseError
from batchkimi.http.errors import error_from_response
from batchkimi.http.response import parse_completion
from batchkimi.http.sse import SSEDecoder
from batchkimi.http.stream import StreamAssembler
from batchkimi.policy.disposition import classify

from .conftest import chunk, sse


def decode_all(data: bytes, cut: int | None = None) -> list[str]:
    dec = SSEDecoder()
    if cut is None:
        out = dec.feed(data) + dec.close()
    else:
        out = dec.feed(data[:cut]) + dec.feed(data[cut:]) + dec.close()
    return [b.decode() for b in out]


STREAMS = [
    pytest.param(b'data: {"a":1}\n\ndata: [DONE]\n\n', ['{"a":1}', "[DONE]"], id="lf"),
    pytest.param(b'data:{"a":1}\n\ndata:[DONE]\n\n', ['{"a":1}', "[DONE]"], id="no-space"),
    pytest.param(b'data: {"a":1}\r\n\r\ndata: [DONE]\r\n\r\n', ['{"a":1}', "[DONE]"], id="crlf"),
    pytest.param(b'data: {"a":1}\r\rdata: [DONE]\r\r', ['{"a":1}', "[DONE]"], id="cr"),
    pytest.param(b': keep-alive\n\nevent: message\nid: 3\ndata: {"a":1}\n\n', ['{"a":1}'], id="comments-and-fields"),
    pytest.param(b'data: {"a":\ndata: 1}\n\n', ['{"a":\n1}'], id="multi-line-data"),
    pytest.param(b'data: [DONE]', ["[DONE]"], id="no-final-blank-line"),
    pytest.param(b'data: {"a":1}\n\ndata: [DONE]\n', ['{"a":1}', "[DONE]"], id="last-event-single-newline"),
    pytest.param(b'data: {"a":\ndata: 1}', ['{"a":\n1}'], id="multi-line-at-eof"),
    pytest.param(b'data: {"a":1}\n\n\n\ndata: {"b":2}\n\n', ['{"a":1}', '{"b":2}'], id="extra-blank-lines"),
    pytest.param(b'data:  two spaces\n\n', [" two spaces"], id="only-one-space-dropped"),
]


@pytest.mark.parametrize("data,expected", STREAMS)
def test_sse_decoder_same_events_at_every_split(data: bytes, expected: list[str]) -> None:
    """Whatever way the socket cuts the bytes, the same events come out."""
    for cut in range(len(data) + 1):
        assert decode_all(data, cut) == expected, f"split at {cut}"


@pytest.mark.parametrize("data,expected", STREAMS)
def test_sse_decoder_same_events_at_every_pair_of_splits(data: bytes, expected: list[str]) -> None:
    """Three reads, cut anywhere: the one-whole-event fast path and the general path agree."""
    for a in range(len(data) + 1):
        for b in range(a, len(data) + 1):
            dec = SSEDecoder()
            out = dec.feed(data[:a]) + dec.feed(data[a:b]) + dec.feed(data[b:]) + dec.close()
            assert [x.decode() for x in out] == expected, f"split at {a} and {b}"


def test_sse_decoder_event_per_read_after_any_prefix() -> None:
    """A paced stream arrives an event per read: each one comes out alone, whatever came before."""
    events = [b'data: {"a":1}\n\n', b"data:{\"b\":2}\n\n", b"data: \n\n", b"data:  x\n\n", b'data: {"c":\ndata: 3}\n\n',
              b"data: y\r\n\r\n", b": ping\n\n", b"data: [DONE]\n\n"]
    expected = [b'{"a":1}', b'{"b":2}', b"", b" x", b'{"c":\n3}', b"y", b"[DONE]"]
    for prefix in (b"", b"\xef\xbb\xbf", b": hello\n\n", b"data: z\r"):
        dec = SSEDecoder()
        first = dec.feed(prefix)
        out = [x for e in events for x in dec.feed(e)] + dec.close()
        if prefix == b"data: z\r":  # a CR ends a line, not the event: the next data line joins it
            assert first == [] and out == [b'z\n{"a":1}'] + expected[1:]
        else:
            assert out == expected, prefix


def test_sse_decoder_handles_a_line_over_128_kib() -> None:
    """Kimi sends single lines far over aiohttp's 128 KiB readline limit."""
    payload = json.dumps({"x": "y" * 300_000})
    data = f"data: {payload}\n\n".encode()
    dec = SSEDecoder()
    out: list[bytes] = []
    for i in range(0, len(data), 7000):
        out += dec.feed(data[i : i + 7000])
    assert out == [payload.encode()]


def assemble(raw: bytes) -> StreamAssembler:
    asm = StreamAssembler()
    for d in SSEDecoder().feed(raw):
        asm.add(d)
    return asm


def test_stream_assembles_reasoning_content_usage_in_choice() -> None:
    """Kimi's default stream: usage sits in choices[0].usage of the finish chunk."""
    usage = {"prompt_tokens": 19, "completion_tokens": 58, "total_tokens": 77, "cached_tokens": 5, "prompt_tokens_details": {"cached_tokens": 5}}
    raw = sse(chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "think "}), chunk({"reasoning_content": "more"}),
              chunk({"content": "Hello"}), chunk({"content": " world"}), chunk({}, "stop", usage))
    a = assemble(raw).finish()
    assert (a.content, a.reasoning_content, a.finish_reason) == ("Hello world", "think more", "stop")
    assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.total_tokens, a.usage.cached_tokens) == (19, 58, 77, 5)


def test_stream_usage_from_include_usage_chunk_and_nested_cached() -> None:
    """With include_usage the usage arrives top-level in a choices: [] chunk; cached only in details."""
    usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 8}}
    raw = sse({**chunk({"content": "hi"}), "usage": None}, {**chunk({}, "stop"), "usage": None},
              {"id": "x", "choices": [], "usage": usage})
    a = assemble(raw).finish()
    assert a.content == "hi" and a.usage.total_tokens == 13 and a.usage.cached_tokens == 8


def test_stream_tool_calls_assembled_by_index_keeping_first_id() -> None:
    """Tool-call deltas: id and name first, then argument fragments, keyed by index."""
    raw = sse(
        chunk({"tool_calls": [{"index": 0, "id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "functions.get_time:1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "changed-by-proxy", "function": {"arguments": '{"city": "'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'Beijing"}'}}]}),
        chunk({}, "tool_calls"),
    )
    a = assemble(raw).finish()
    assert a.finish_reason == "tool_calls"
    assert a.tool_calls == [
        {"id": "functions.get_weather:0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}},
        {"id": "functions.get_time:1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]


def test_stream_without_done_is_a_failed_attempt_not_an_answer() -> None:
    """A stream cut before [DONE] never becomes a half answer."""
    raw = sse(chunk({"content": "half an ans"}), done=False)
    with pytest.raises(ResponseError) as info:
        assemble(raw).finish()
    assert info.value.error_type == "stream_cut" and info.value.retryable


def test_error_event_inside_a_200_stream_raises() -> None:
    asm = StreamAssembler()
    asm.add(json.dumps(chunk({"content": "x"})))
    with pytest.raises(APIError) as info:
        asm.add(json.dumps({"error": {"type": "server_error", "message": "boom"}}))
    assert info.value.retryable and "boom" in info.value.message


def test_events_glued_without_blank_line_still_parse() -> None:
    """A server that forgets the blank line between events: data lines join, batchkimi splits them."""
    raw = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\ndata: {"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    a = assemble(raw).finish()
    assert a.content == "ab" and a.finish_reason == "stop"


def test_parse_completion_reads_reasoning_tool_calls_and_both_cached_spellings() -> None:
    body = {"id": "chatcmpl-1", "model": "kimi-k2.6", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Answer", "reasoning_content": "Because"}}],
        "usage": {"prompt_tokens": 1336, "completion_tokens": 214, "total_tokens": 1550, "cached_tokens": 1280}}
    a = parse_completion(json.dumps(body).encode())
    assert (a.content, a.reasoning_content, a.usage.cached_tokens, a.response_id) == ("Answer", "Because", 1280, "chatcmpl-1")


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"choices": []}', b'{"id": "x"}'], ids=["garbage", "list", "no-choices", "empty"])
def test_parse_completion_refuses_anything_less_than_an_answer(body: bytes) -> None:
    with pytest.raises(ResponseError):
        parse_completion(body)


ERRORS = [
    pytest.param(401, b'{"error":{"type":"authentication_error","code":"401002","message":"invalid api key","source":"gateway","request_id":"r1"}}',
                 "authentication_error", False, True, id="tokenhub-401"),
    pytest.param(401, b'{"error":{"message":"Invalid Authentication","type":"invalid_authentication_error"}}',
                 "invalid_authentication_error", False, True, id="moonshot-401"),
    pytest.param(402, b'{"error":{"type":"permission_error","code":"401007","message":"endpoint is inactive: FREE_QUOTA_EXHAUSTED"}}',
                 "permission_error", False, True, id="quota-402"),
    pytest.param(429, b'{"error":{"message":"You exceeded your current token quota: <org> 0, please check your account balance","type":"exceeded_current_quota_error"}}',
                 "exceeded_current_quota_error", False, True, id="moonshot-quota-429"),
    pytest.param(429, b'{"error":{"type":"rate_limit_error","code":"429001","message":"rate limit exceeded on dimension: rpm"}}',
                 "rate_limit_error", True, False, id="tokenhub-429"),
    pytest.param(429, b'{"error":{"message":"The engine is currently overloaded, please try again later","type":"engine_overloaded_error"}}',
                 "engine_overloaded_error", True, False, id="overloaded"),
    pytest.param(400, b'{"error":{"message":"invalid temperature: only 1 is allowed for this model","type":"invalid_request_error"}}',
                 "invalid_request_error", False, False, id="400"),
    pytest.param(404, b'{"error":{"message":"Not found the model x or Permission denied","type":"resource_not_found_error"}}',
                 "resource_not_found_error", False, True, id="404-unknown-model-stops"),
    pytest.param(404, b"<html><body>404 Not Found</body></html>", "http_error", False, True, id="404-wrong-path-stops"),
    pytest.param(400, b'{"error":{"type":"invalid_request_error","code":"400002","message":"invalid parameter \'model\': model x is not supported"}}',
                 "invalid_request_error", False, True, id="tokenhub-400-model-stops"),
    pytest.param(451, b'{"error":{"type":"content_filter_error","code":"451001","message":"content was filtered by safety policy"}}',
                 "content_filter_error", False, False, id="451"),
    pytest.param(500, b'{"error":{"message":"invalid state transition","type":"unexpected_output"}}', "unexpected_output", True, False, id="500"),
    pytest.param(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "http_error", True, False, id="html-502"),
    pytest.param(504, b"", "http_error", True, False, id="empty-504"),
    pytest.param(413, b"<html>413 Request Entity Too Large</html>", "request_too_large", False, False, id="html-413"),
]


@pytest.mark.parametrize("status,body,etype,retryable,fatal", ERRORS)
def test_errors_parsed_and_classified(status: int, body: bytes, etype: str, retryable: bool, fatal: bool) -> None:
    """Both envelopes and non-JSON bodies; retry and stop decisions per tokenhub-api.md §6.4."""
    err = error_from_response(status, body)
    assert (err.error_type, err.retryable, err.fatal, err.http_status) == (etype, retryable, fatal, status)
    assert err.message


def test_moonshot_try_again_hint_becomes_retry_after() -> None:
    body = b'{"error":{"message":"Your account org-1<ak-1> request reached organization max RPM: 3, please try again after 7 seconds","type":"rate_limit_reached_error"}}'
    err = error_from_response(429, body)
    assert err.retryable and err.retry_after_s == 7.0


def test_tokenhub_request_id_kept() -> None:
    err = error_from_response(400, b'{"error":{"type":"invalid_request_error","code":"400001","message":"m","request_id":"abc"}}')
    assert err.request_id == "abc" and err.code == "400001"


def test_classify_rate_limit_words_are_not_quota() -> None:
    assert classify(429, "rate_limit_reached_error", "request reached organization TPD rate limit, current: 1, limit: 1", None) == (True, False)


def test_sse_bom_at_the_start_of_a_stream_is_skipped_at_every_split() -> None:
    data = b'\xef\xbb\xbfdata: {"a":1}\n\ndata: [DONE]\n\n'
    for cut in range(len(data) + 1):
        assert decode_all(data, cut) == ['{"a":1}', "[DONE]"], f"split at {cut}"


def test_sse_an_empty_read_keeps_a_pending_cr() -> None:
    """A CRLF split across reads, with an empty read between, is still one line end."""
    dec = SSEDecoder()
    out = dec.feed(b"data: a\r") + dec.feed(b"") + dec.feed(b"\ndata: b\r\n\r\n")
    assert out == [b"a\nb"]


def test_retry_after_date_with_minus_zero_zone_is_utc(monkeypatch) -> None:
    import time as _time

    from batchkimi.policy.retry import parse_retry_after

    monkeypatch.setenv("TZ", "CST-8")  # UTC+8, a POSIX rule: no tz database needed
    _time.tzset()
    try:
        import email.utils

        now = 1_790_000_000.0
        date = email.utils.formatdate(now + 20, usegmt=True).replace(" GMT", " -0000")
        assert parse_retry_after(date, now) == pytest.approx(20.0, abs=1.0)
    finally:
        monkeypatch.delenv("TZ")
        _time.tzset()


def test_a_rate_limit_error_mentioning_a_quota_is_still_a_rate_limit() -> None:
    """The error type decides before the message's words."""
    body = b'{"error":{"type":"rate_limit_error","code":"429001","message":"rate limit: token quota exhausted for this minute"}}'
    err = error_from_response(429, body)
    assert (err.retryable, err.fatal) == (True, False)
    assert error_from_response(429, b'{"error":{"type":"x","message":"your quota is exhausted"}}').fatal


def test_a_stream_of_nothing_but_done_is_no_answer() -> None:
    """[DONE] alone: complete, but nothing came. Never an ok row with empty content."""
    with pytest.raises(ResponseError) as info:
        assemble(b"data: [DONE]\n\n").finish()
    assert info.value.error_type == "bad_stream" and info.value.retryable
