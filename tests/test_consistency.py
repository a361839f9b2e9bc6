"""The client and the simulator give one answer for each case (issue "A rehearsal that looks like
Kimi", item 4): what the client sends the simulator takes, and what the simulator refuses the
client refuses first, from the bytes, never from a label."""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path
from typing import Any

import pytest

import batchkimi
from batchkimi.request import RowInvalid, build_request

from .conftest import fast_job, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
MEDIA = ROOT / "sample_data" / "media"


def post(port: int, body: dict[str, Any], path: str = "/v1/chat/completions", method: str = "POST",
         key: str | None = "sk-test") -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        conn.request(method, path, body=json.dumps(body) if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def data_url(mime: str, path: Path | None = None, raw: bytes | None = None) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw if raw is not None else path.read_bytes()).decode()}"  # type: ignore[union-attr]


def test_a_developer_turn_is_sent_as_the_system_turn_kimi_knows(tmp_path: Path, simulator) -> None:
    h = simulator()
    job = fast_job(tmp_path, h.base_url, thinking="disabled", max_tokens=64)
    body = build_request({"messages": [{"role": "developer", "content": "Be brief."},
                                       {"role": "user", "content": "hi"}]}, job).body
    assert body["messages"][0]["role"] == "system"
    assert post(h.port, body)[0] == 200
    raw = {**body, "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]}
    assert post(h.port, raw)[0] == 400  # Kimi's roles: a raw developer turn is refused, by both


def test_a_null_reasoning_in_a_tool_call_turn_is_missing_on_both_sides(tmp_path: Path, simulator) -> None:
    h = simulator()
    turns = [{"role": "user", "content": "weather?"},
             {"role": "assistant", "content": "", "reasoning_content": None,
              "tool_calls": [{"id": "functions.w:0", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "functions.w:0", "content": "sunny"}]
    job = fast_job(tmp_path, h.base_url, thinking="enabled", max_tokens=20000)
    with pytest.raises(RowInvalid, match="without reasoning_content"):
        build_request({"messages": turns}, job)
    status, err = post(h.port, {"model": "kimi-k2.6", "messages": turns})
    assert status == 400 and "reasoning_content is missing" in err["error"]["message"]


@pytest.mark.parametrize("kind,label,source,raw", [
    ("video", "video/mp4", None, b"not a video at all" * 64),
    ("image", "image/jpeg", MEDIA / "images" / "circle.png", None),
], ids=["junk-labelled-mp4", "png-labelled-jpeg"])
def test_a_label_that_is_not_the_bytes(tmp_path: Path, simulator, kind: str, label: str, source: Path | None,
                                       raw: bytes | None) -> None:
    """The simulator refuses a label its bytes belie; the client corrects it (PNG) or refuses it (junk) first."""
    h = simulator()
    url = data_url(label, source, raw)
    part = {"type": f"{kind}_url", f"{kind}_url": {"url": url}}
    status, _ = post(h.port, {"model": "kimi-k2.6", "thinking": {"type": "disabled"},
                              "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, part]}]})
    assert status == 400
    data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "what?", kind: url}])
    job = fast_job(tmp_path, h.base_url, input=str(data), thinking="disabled", max_tokens=64)
    summary = batchkimi.run(job)
    assert summary.final_status == ({"ok": 1} if source is not None else {"invalid": 1})
    assert h.simulator.stats["by_status"].get(400, 0) == 1  # only the raw post above: the client never sent a 400


@pytest.mark.parametrize("style", ["tokenhub", "moonshot"])
def test_models_errors_in_the_chat_envelope(simulator, style: str) -> None:
    h = simulator(error_style=style, api_keys=["sk-good"])
    status, chat = post(h.port, {"model": "kimi-k2.6", "messages": [{"role": "user", "content": "hi"}]}, key="sk-bad")
    status_m, models = post(h.port, {}, path="/v1/models", method="GET", key="sk-bad")
    assert status == status_m == 401 and set(chat["error"]) == set(models["error"])
