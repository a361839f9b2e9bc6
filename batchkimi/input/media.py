"""Images and videos: found in a row, checked before anything is sent, read when sent.

A row names its media in image and video columns (``image``, ``images``, ``video``,
``videos`` by default: a path or URL each, or a list of them) or as ``image_url`` /
``video_url`` parts of its ``messages``. Each reference is one of:

- an ``http(s)://`` URL: sent untouched (TokenHub fetches it);
- a ``data:`` URL: decoded once to check its type and count its tokens, and sent with the type
  its bytes are (a wrong label is corrected, a type Kimi cannot take is refused);
- a local path (or ``file://`` URL): resolved under the *media root*, checked, and read,
  base64-encoded and put in the request only when that request is about to be sent.

Checking (the :class:`Collector`, run when the row is prepared, so ``--dry-run`` sees it too)
refuses, naming the column and the file: a path that leaves the media root
(:mod:`.sandbox`), anything but a regular file, a missing or unreadable file, content that is
not an image or video Kimi takes or a damaged image (:mod:`.sniff`: the type comes from the
bytes, a file's name is never trusted), a video for a model that takes none, and a request that
would pass the body limit. The bytes are read when the request is sent (:mod:`.send`), under
the job's budget of bytes in flight (:mod:`batchkimi.policy.bytes`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import secrets
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tokens import URL_MEDIA_TOKENS, image_tokens, video_tokens
from .sandbox import local_ref, resolve
from .sniff import Known, MediaInvalid, Sniffed, sniff_bytes, sniff_file

# One marker per process: a row's text cannot guess it, so it never collides with a prompt.
_MARK = f"batchkimi-media-{secrets.token_hex(8)}-"

@dataclass(frozen=True, slots=True)
class MediaItem:
    """One image or video of a row, as checked when the row was prepared."""

    kind: str  # image | video
    source: str  # file | url | data | bytes
    ref: str  # as the row wrote it (a data URL shortened)
    where: str  # the column or message part it came from
    mime: str | None = None
    path: str | None = None  # the resolved file (source "file", or a file sent by URL prefix)
    marker: str | None = None  # the placeholder in the encoded body (source "file" only)
    size_bytes: int | None = None
    mtime_ns: int | None = None
    width: int | None = None
    height: int | None = None
    send_width: int | None = None
    send_height: int | None = None
    tokens: int = URL_MEDIA_TOKENS
    body_bytes: int = 0  # what it adds to the request body (an estimate when downscaled)
    sha256: str | None = None  # known here for data URLs and bytes; for files, when read
    inline: bytes | None = field(default=None, repr=False)  # the bytes, for source "bytes"

    def record(self, **sent: Any) -> dict[str, Any]:
        """What the output keeps of this item: never its bytes."""
        return {
            "path": self.ref, "kind": self.kind, "source": self.source, "mime": self.mime,
            "bytes": self.size_bytes, "width": self.width, "height": self.height,
            "sent_width": self.send_width, "sent_height": self.send_height,
            "sent_bytes": sent.get("sent_bytes"), "sha256": sent.get("sha256", self.sha256),
        }


@dataclass(frozen=True)
class MediaSettings:
    """The job's media keys, resolved for one input (see :func:`settings_for`)."""

    image_columns: tuple[str, ...]
    video_columns: tuple[str, ...]
    root: Path | None  # None: local paths are refused
    url_prefix: str | None
    max_image_side: int | None
    max_request_bytes: int
    video_ok: bool  # the model takes video
    model: str
    dirs: dict[str, str] = field(default_factory=dict, compare=False, repr=False)  # real paths of folders

    @functools.cached_property
    def columns(self) -> tuple[str, ...]:
        return (*self.image_columns, *self.video_columns)


# ---- sizes and tokens ----------------------------------------------------------------------
def send_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """The pixel size sent: the longest side brought down to ``max_side``, aspect kept."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _cost(sniffed: Sniffed, size_bytes: int, max_side: int | None) -> tuple[int | None, int | None, int]:
    """(width sent, height sent, tokens): an image by its tiles at the size sent (a GIF is never
    downscaled), a video by its bytes."""
    if sniffed.width is None or sniffed.height is None:
        return None, None, video_tokens(size_bytes)
    sw, sh = send_size(sniffed.width, sniffed.height, max_side if sniffed.mime != "image/gif" else None)
    return sw, sh, image_tokens(sw, sh)


def data_url_bytes(mime: str, raw_bytes: int) -> int:
    return len("data:;base64,") + len(mime) + 4 * ((raw_bytes + 2) // 3)


# ---- references ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Inline:
    """An image or video whose bytes are in the row itself (a binary column, or a Hugging Face
    ``Image`` struct ``{"bytes", "path"}``)."""

    data: bytes = field(repr=False)
    name: str | None = None


def _ref(v: Any) -> str | Inline | None:
    """One value as a reference: a path or URL, inline bytes, or None (nothing there)."""
    if isinstance(v, str):
        return v if v.strip() else None
    if isinstance(v, bytes | bytearray | memoryview):
        return Inline(bytes(v)) if len(v) else None
    if isinstance(v, dict) and ("bytes" in v or "path" in v):  # Hugging Face datasets' Image feature
        raw, path = v.get("bytes"), v.get("path")
        if isinstance(raw, bytes | bytearray | memoryview) and len(raw):
            return Inline(bytes(raw), path if isinstance(path, str) else None)
        return path if isinstance(path, str) and path.strip() else None
    raise TypeError(type(v).__name__)


def _refs(value: Any, column: str) -> list[tuple[str | Inline, str]]:
    """(reference, where) for a column's value: one reference, or a list of them."""
    if value is None:
        return []
    if hasattr(value, "tolist") and not isinstance(value, bytes | bytearray | memoryview):  # a numpy array from Parquet
        value = value.tolist()
    items = list(enumerate(value)) if isinstance(value, list | tuple) else [(None, value)]
    out: list[tuple[str | Inline, str]] = []
    for i, v in items:
        where = column if i is None else f"{column}[{i}]"
        try:
            ref = _ref(v) if v is not None else None
        except TypeError as exc:
            raise MediaInvalid(f"column '{where}' must be a path or URL, image bytes, or a list of them; "
                               f"got {exc}") from None
        if ref is not None:
            out.append((ref, where))
    return out


class Collector:
    """Turns one row's media references into request parts and :class:`MediaItem` s."""

    def __init__(self, settings: MediaSettings, known: Mapping[str, Known] | None = None) -> None:
        self.s = settings
        self.known = known
        self.items: list[MediaItem] = []
        self.body_bytes = 0

    def part(self, kind: str, ref: str | Inline, where: str) -> dict[str, Any]:
        url: str | None = None
        if isinstance(ref, Inline):
            item = self._inline_item(kind, ref, where)
        elif ref[:5].lower() == "data:":
            item, url = self._data_item(kind, ref, where)
        else:
            item = self._item(kind, ref, where)
        self.items.append(item)
        self.body_bytes += item.body_bytes
        if url is None:
            url = item.marker if item.marker is not None else self._url(item, str(ref))
        return {"type": f"{kind}_url", f"{kind}_url": {"url": url}}

    def _url(self, item: MediaItem, ref: str) -> str:
        if item.source == "url" and item.path is not None and self.s.url_prefix:
            rel = Path(item.path).relative_to(self.s.root) if self.s.root else Path(ref)
            return self.s.url_prefix.rstrip("/") + "/" + urllib.parse.quote(rel.as_posix())
        return ref

    def _item(self, kind: str, ref: str, where: str) -> MediaItem:
        try:
            local = local_ref(ref)
        except MediaInvalid as exc:
            raise MediaInvalid(f"{where}: {exc}") from None
        if local is None:
            if kind == "video" and not self.s.video_ok:
                raise MediaInvalid(f"{where}: {self.s.model} takes no video (use kimi-k2.6)")
            return MediaItem(kind, "url", ref, where, tokens=URL_MEDIA_TOKENS, body_bytes=len(ref))
        if self.s.root is None:
            raise MediaInvalid(f"{where}: {ref!r} is a local path, and no media_root is set")
        try:
            real, st = resolve(local, self.s.root, self.s.dirs)
        except MediaInvalid as exc:
            raise MediaInvalid(f"{where}: {exc}") from None
        known = self.known.get(local) if self.known else None
        try:
            if known is not None and (known.size, known.mtime_ns) == (st.st_size, st.st_mtime_ns):
                if known.problem is not None:  # what the folder walk found in these very bytes
                    raise MediaInvalid(known.problem)
                assert known.sniffed is not None
                sniffed = known.sniffed
            else:
                sniffed = sniff_file(real)
        except MediaInvalid as exc:
            raise MediaInvalid(f"{where}: {_name(ref)} {exc}") from None
        self._accept(sniffed, kind, where, repr(ref))
        rel = os.path.relpath(real, self.s.root)
        sw, sh, tokens = _cost(sniffed, st.st_size, self.s.max_image_side)
        by_url = self.s.url_prefix is not None
        marker = None if by_url else f"{_MARK}{len(self.items)}"
        body = len(self.s.url_prefix or "") + len(rel) + 8 if by_url else data_url_bytes(sniffed.mime, st.st_size)
        return MediaItem(kind, "url" if by_url else "file", rel if not os.path.isabs(local) else real, where,
                         mime=sniffed.mime, path=real, marker=marker, size_bytes=st.st_size, mtime_ns=st.st_mtime_ns,
                         width=sniffed.width, height=sniffed.height, send_width=sw, send_height=sh,
                         tokens=tokens, body_bytes=body)

    def _accept(self, sniffed: Sniffed, kind: str, where: str, what: str) -> None:
        """Refuse an image where a video was named (or the reverse), and video for a model without it."""
        if sniffed.kind != kind:
            held, named = ("an image", "a video") if sniffed.kind == "image" else ("a video", "an image")
            raise MediaInvalid(f"{where}: {what} holds {held} ({sniffed.mime}), not {named}: name it as {held}")
        if kind == "video" and not self.s.video_ok:
            raise MediaInvalid(f"{where}: {what} is a video, and {self.s.model} takes no video (use kimi-k2.6)")

    def _inline_item(self, kind: str, inline: Inline, where: str) -> MediaItem:
        """Bytes in the row: checked now, base64-encoded when sent (like a file)."""
        raw = inline.data
        label = inline.name or f"<{len(raw):,} bytes>"
        try:
            sniffed = sniff_bytes(raw)
        except MediaInvalid as exc:
            raise MediaInvalid(f"{where}: {label} {exc}") from None
        self._accept(sniffed, kind, where, label)
        sw, sh, tokens = _cost(sniffed, len(raw), self.s.max_image_side)
        return MediaItem(kind, "bytes", label, where, mime=sniffed.mime, marker=f"{_MARK}{len(self.items)}",
                         size_bytes=len(raw), width=sniffed.width, height=sniffed.height, send_width=sw, send_height=sh,
                         tokens=tokens, body_bytes=data_url_bytes(sniffed.mime, len(raw)),
                         sha256=hashlib.sha256(raw).hexdigest(), inline=raw)

    def _data_item(self, kind: str, ref: str, where: str) -> tuple[MediaItem, str]:
        """A data URL, checked, and the URL to send: the bytes decide its type (a ``video/quicktime``,
        ``application/octet-stream`` or ``image/bmp`` label on PNG bytes goes out under Kimi's name
        for what the bytes are)."""
        head, sep, b64 = ref.partition(",")
        declared = head[5:].split(";")[0].lower()
        if not sep or not head.lower().endswith(";base64"):
            raise MediaInvalid(f"{where}: a data URL must be 'data:<type>;base64,<data>'")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise MediaInvalid(f"{where}: the data URL's base64 is damaged") from None
        try:
            sniffed = sniff_bytes(raw)
        except MediaInvalid as exc:
            raise MediaInvalid(f"{where}: the data URL ({declared or 'no type'}) {exc}") from None
        self._accept(sniffed, kind, where, "the data URL")
        _, _, tokens = _cost(sniffed, len(raw), None)  # sent as it is: never downscaled
        url = ref if declared == sniffed.mime else f"data:{sniffed.mime};base64,{b64}"
        short = f"data:{declared};base64,...({len(raw)} bytes)"
        item = MediaItem(kind, "data", short, where, mime=sniffed.mime, size_bytes=len(raw),
                         width=sniffed.width, height=sniffed.height, send_width=sniffed.width, send_height=sniffed.height,
                         tokens=tokens, body_bytes=len(url), sha256=hashlib.sha256(raw).hexdigest())
        return item, url

    # ---- where references live ---------------------------------------------------------
    def column_parts(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        for c in self.s.columns:
            if row.get(c) is not None:
                break
        else:
            return []  # most rows: no media, nothing more to look at
        parts = []
        for kind, columns in (("image", self.s.image_columns), ("video", self.s.video_columns)):
            for column in columns:
                for ref, where in _refs(row.get(column), column):
                    parts.append(self.part(kind, ref, f"column '{where}'" if "[" not in where else where))
        return parts

    def message_parts(self, messages: list[dict[str, Any]], column: str) -> list[dict[str, Any]]:
        """``messages`` with each local image/video part swapped for its placeholder."""
        out = []
        for i, m in enumerate(messages):
            content = m.get("content")
            if not isinstance(content, list) or not any(_is_media_part(p) for p in content):
                out.append(m)
                continue
            parts = []
            for j, p in enumerate(content):
                if not _is_media_part(p):
                    parts.append(p)
                    continue
                kind = p["type"].split("_")[0]
                ref_obj = p.get(p["type"])
                url = ref_obj.get("url") if isinstance(ref_obj, dict) else ref_obj
                where = f"{column}[{i}].content[{j}]"
                if not isinstance(url, str) or not url.strip():
                    raise MediaInvalid(f"{where}.{p['type']}.url must be a URL or a path")
                new = self.part(kind, url, where)
                if isinstance(ref_obj, dict):  # keep other keys (such as "detail") as they were
                    new[p["type"]] = {**ref_obj, "url": new[p["type"]]["url"]}
                parts.append(new)
            out.append({**m, "content": parts})
        return out


def _is_media_part(p: Any) -> bool:
    return isinstance(p, dict) and p.get("type") in ("image_url", "video_url")


def _name(ref: str) -> str:
    return repr(ref if len(ref) <= 200 else ref[:200] + "...")


def has_media(row: dict[str, Any], settings: MediaSettings, messages_keys: tuple[str, ...]) -> bool:
    """Cheap: might this row hold media (so its preparation reads files)?"""
    for column in (*settings.image_columns, *settings.video_columns):
        if row.get(column) is not None:
            return True
    for key in messages_keys:
        value = row.get(key)
        if key == "body" and isinstance(value, dict):
            value = value.get("messages")
        if isinstance(value, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in value):
            return True
    return False


def settings_for(job: Any, input_path: Path | None) -> MediaSettings:
    """The job's media keys for one input: local paths resolve under ``media_root``, else the
    input's folder (a folder input is its own root)."""
    if job.media_root:
        root: Path | None = Path(os.path.realpath(Path(job.media_root).expanduser()))
    elif input_path is not None:
        p = Path(input_path)
        root = Path(os.path.realpath(p if p.is_dir() else p.parent))
    else:
        root = None
    from ..kimi import takes_video

    return MediaSettings(
        image_columns=tuple(job.image_columns), video_columns=tuple(job.video_columns), root=root,
        url_prefix=job.media_url_prefix, max_image_side=job.max_image_side,
        max_request_bytes=int(job.max_request_mb * 1_000_000),
        video_ok=takes_video(job.served_model) or not job.applies_kimi_rules, model=job.served_model,
    )
