"""Row in, request body out. Pure: no I/O.

A row gives its conversation in one of three ways, first match wins:

1. an OpenAI Batch API line: ``{"custom_id", "method", "url", "body": {...}}``;
2. a ``messages`` column: an OpenAI chat ``messages`` list, multi-turn, with assistant turns
   carrying ``reasoning_content`` and ``tool_calls``;
3. a ``prompt`` column, or the job's ``prompt_template`` with ``{column}`` placeholders
   (``{{`` and ``}}`` for literal braces; other braces are left alone, so JSON examples in a
   template need no escaping), plus an optional ``system`` column or job ``system``.

Values that are not strings enter a prompt as JSON (a Parquet struct or list as
``{"a": 1}``, not Python's repr). The body is encoded here, once: a value that cannot be sent
as JSON makes the row invalid instead of failing later in the transport.

A row that cannot make a request raises :class:`RowInvalid`, naming the column to fix.
Images and videos (see :mod:`batchkimi.input.media`) come from the job's image and video columns,
after the prompt in the user turn, or from ``image_url``/``video_url`` parts of ``messages``.
A local file is checked here and stands in the encoded body as a placeholder: its bytes are
read only when the request is sent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from . import kimi
from .config import Job
from .input.media import Collector, Known, MediaInvalid, MediaItem, MediaSettings, settings_for
from .tokens import URL_MEDIA_TOKENS, estimate_messages_tokens

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
DROPPED_BATCH_KEYS = frozenset({"parallel_tool_calls", "store", "metadata", "reasoning_effort", "service_tier"})
BATCH_URLS = ("/v1/chat/completions", "/chat/completions")


class RowInvalid(Exception):
    """This row cannot become a request; the message names the column or key to fix."""


@dataclass(slots=True)
class Prepared:
    body: dict[str, Any]
    prompt_tokens_estimate: int
    payload: bytes  # ``body`` as the JSON bytes sent (with a placeholder per local file)
    media: tuple[MediaItem, ...] = ()  # the row's images and videos, checked
    request_bytes: int = 0  # the size of the request sent, local files included (estimated)
    sample: int = 0  # which of the row's samples (a job with samples > 1)

    @property
    def reads_files(self) -> bool:
        """Whether files must be read (or bytes encoded) when this request is sent."""
        return any(item.path is not None or item.inline is not None for item in self.media)


def keeps_reasoning(body: dict[str, Any]) -> bool:
    """Whether a request passes the reasoning of its history to the model (and pays for it):
    ``thinking.keep = "all"``; without it Kimi drops that reasoning."""
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("keep") == "all"


def as_text(value: Any) -> str:
    """A row value as prompt text: strings as they are, structures as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_template(template: str, row: dict[str, Any]) -> str:
    def sub(m: re.Match[str]) -> str:
        token = m.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        name = m.group(1)
        if name not in row:
            have = ", ".join(sorted(row)) or "none"
            raise RowInvalid(f"the prompt_template names column '{name}', which this row does not have (it has: {have})")
        value = row[name]
        if value is None:
            raise RowInvalid(f"column '{name}' is null, and the prompt_template needs it")
        return as_text(value)

    return _PLACEHOLDER.sub(sub, template)


def _check_messages(messages: Any, job: Job, column: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RowInvalid(f"column '{column}' must be a non-empty list of chat messages")
    clean: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowInvalid(f"{column}[{i}] is not an object")
        # Parquet structs give every field of every message: drop the empty ones.
        m = {k: v for k, v in m.items() if v is not None}
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system turn; Kimi knows only "system"
            m["role"] = role = "system"
        if role not in kimi.ROLES:
            raise RowInvalid(f"{column}[{i}].role is {role!r}; expected system, user, assistant or tool")
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)):
            raise RowInvalid(f"{column}[{i}].tool_calls must be a list of {{id, type, function: {{name, arguments}}}} objects")
        if role == "assistant" and m.get("tool_calls"):
            if job.applies_kimi_rules and kimi.missing_reasoning(m, job.thinking_on):
                raise RowInvalid(
                    f"{column}[{i}] is an assistant tool-call turn without reasoning_content; with "
                    "thinking on Kimi refuses it ('thinking is enabled but reasoning_content is missing "
                    f"in assistant tool call message at index {i}'): write the reasoning back"
                )
        elif role == "tool":
            if "tool_call_id" not in m:
                raise RowInvalid(f"{column}[{i}] is a tool turn without tool_call_id")
        elif m.get("content") in (None, "", []):
            raise RowInvalid(f"{column}[{i}].content is empty; Kimi requires content")
        clean.append(m)
    return clean


def build_request(row: dict[str, Any], job: Job, *, batch_line: bool = False,
                  media: MediaSettings | None = None, known: Mapping[str, Known] | None = None) -> Prepared:
    """The chat-completion body for one row. ``media`` defaults to the job's media keys with
    no dataset folder: URLs pass, a local path is read only under the job's ``media_root``.
    ``known``: what a folder walk already found in the row's files (by path)."""
    collector = Collector(media if media is not None else settings_for(job, None), known)
    try:
        return _build(row, job, batch_line, collector)
    except MediaInvalid as exc:
        raise RowInvalid(str(exc)) from None


def _build(row: dict[str, Any], job: Job, batch_line: bool, collector: Collector) -> Prepared:
    overrides: dict[str, Any] = {}
    if batch_line:
        url = row.get("url")
        if url is not None and url not in BATCH_URLS:
            raise RowInvalid(f"key 'url' is {url!r}: batchkimi sends chat completions only ({BATCH_URLS[0]})")
        line_body = row.get("body")
        if not isinstance(line_body, dict):
            raise RowInvalid("key 'body' must be an object (OpenAI batch format)")
        messages = _check_messages(line_body.get("messages"), job, "body.messages")
        messages = collector.message_parts(messages, "body.messages")
        for key, value in line_body.items():
            if key in kimi.ROW_BODY_KEYS:
                overrides[key] = value
        if "max_completion_tokens" in overrides:  # the line's budget, sent as Kimi's max_tokens
            overrides["max_tokens"] = overrides.pop("max_completion_tokens")
        unknown = set(line_body) - kimi.ROW_BODY_KEYS - DROPPED_BATCH_KEYS - {"messages", "model", "stream", "stream_options"}
        if unknown:
            raise RowInvalid(f"body has keys batchkimi does not send: {', '.join(sorted(unknown))}")
    elif row.get(job.messages_column) is not None:
        for column in (*collector.s.image_columns, *collector.s.video_columns):
            if row.get(column) is not None:
                raise RowInvalid(f"column '{column}' is set, and the conversation comes from '{job.messages_column}': "
                                 f"put the {column.rstrip('s')} in an image_url or video_url part of a message")
        messages = _check_messages(row[job.messages_column], job, job.messages_column)
        messages = collector.message_parts(messages, job.messages_column)
    else:
        if job.prompt_template is not None:
            prompt = render_template(job.prompt_template, row)
        else:
            value = row.get(job.prompt_column)
            if value is None:
                raise RowInvalid(
                    f"no '{job.prompt_column}' column and no prompt_template: give each row a "
                    f"'{job.prompt_column}' or '{job.messages_column}', or set prompt_template"
                )
            prompt = as_text(value)
        if not prompt.strip():
            raise RowInvalid("the prompt is empty")
        system = row.get(job.system_column) or job.system
        parts = collector.column_parts(row)
        content: Any = [{"type": "text", "text": prompt}, *parts] if parts else prompt
        messages = []
        if system:
            messages.append({"role": "system", "content": as_text(system)})
        messages.append({"role": "user", "content": content})

    body: dict[str, Any] = {"model": job.model, "messages": messages}
    if job.thinking is not None or job.applies_kimi_rules:
        thinking: dict[str, Any] = {"type": "enabled" if job.thinking_on else "disabled"}
        if job.thinking_keep:
            thinking["keep"] = job.thinking_keep
        body["thinking"] = thinking
    max_tokens = job.effective_max_tokens
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "tool_choice", "response_format", "stop"):
        value = getattr(job, key)
        if value is not None:
            body[key] = value
    if job.tools is not None:
        body["tools"] = list(job.tools)
    body.update(job.extra_body)
    if overrides:
        _check_row_overrides(overrides, job)
        body.update(overrides)
    if job.streaming:
        body["stream"] = True
        if job.sends_include_usage:
            body["stream_options"] = {"include_usage": True}
    try:
        payload = orjson.dumps(body, default=str, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise RowInvalid(f"the row holds a value that cannot be sent as JSON ({exc})") from None
    if not collector.items:
        return _fits(job, Prepared(body, estimate_messages_tokens(messages, history_reasoning=keeps_reasoning(body)), payload,
                                   request_bytes=len(payload)))
    items = tuple(collector.items)
    tokens_by_url = {(i.marker or i.ref): i.tokens for i in items}

    def media_tokens(part: dict[str, Any]) -> int:
        ref = part.get(part.get("type", ""))
        url = ref.get("url") if isinstance(ref, dict) else ref
        return tokens_by_url.get(url, URL_MEDIA_TOKENS) if isinstance(url, str) else URL_MEDIA_TOKENS

    size = len(payload) + sum(i.body_bytes - len(i.marker) for i in items if i.marker is not None)
    limit = collector.s.max_request_bytes
    if size > limit:
        biggest = max(items, key=lambda i: i.body_bytes)
        raise RowInvalid(f"the request would be about {size / 1e6:,.1f} MB, over the {limit / 1e6:g} MB limit "
                         f"(the largest item: {biggest.where}, {biggest.ref!r}, {biggest.body_bytes / 1e6:,.1f} MB "
                         "as base64); set max_image_side to send smaller images, or split the row")
    return _fits(job, Prepared(body, estimate_messages_tokens(messages, media_tokens, history_reasoning=keeps_reasoning(body)),
                               payload, items, size))


def _fits(job: Job, prepared: Prepared) -> Prepared:
    """Refuse a request that can never be sent: its prompt over the job's ``tpm`` (no wait lets it
    through), or over Kimi's context window (see :func:`kimi.context_overflow`)."""
    if job.tpm and prepared.prompt_tokens_estimate > job.tpm:
        raise RowInvalid(f"the prompt is about {prepared.prompt_tokens_estimate:,} tokens (estimated), over the job's "
                         f"tpm limit of {job.tpm:,g}: it could never be sent within it (raise tpm, or shorten the prompt)")
    if job.applies_kimi_rules:
        budget = prepared.body.get("max_tokens")
        why = kimi.context_overflow(prepared.prompt_tokens_estimate, budget if type(budget) is int else None)
        if why is not None:
            raise RowInvalid(why)
    return prepared




def _check_row_overrides(overrides: dict[str, Any], job: Job) -> None:
    if not job.applies_kimi_rules:
        return
    thinking = overrides.get("thinking")
    thinking_on = job.thinking_on if not isinstance(thinking, dict) else thinking.get("type") != "disabled"
    violation = kimi.rule_violation(overrides, thinking_on)
    if violation is not None:
        key, message = violation
        raise RowInvalid(f"body.{key} = {overrides[key]!r}: Kimi would refuse it ('{message}'); remove it from the batch line")


def thinking_budget_note(prepared: Prepared, job: Job, source: str) -> str | None:
    """A warning when this request's thinking budget is under Kimi's floor (see :mod:`batchkimi.kimi`)."""
    if not job.applies_kimi_rules:
        return None
    thinking = prepared.body.get("thinking")
    on = not (isinstance(thinking, dict) and thinking.get("type") == "disabled")
    budget = prepared.body.get("max_tokens")
    return kimi.thinking_budget_note(budget if type(budget) is int else None, on, source)
