"""Images and videos: found in a row, checked before anything is sent, read when sent.

A row names its media in image and video columns (``image``, ``images``, ``video``,
``videos`` by default: a path or URL each, or a list of them) or as ``image_url`` /
``video_url`` parts of its ``messages``. Each reference is one of:

- an ``http(s)://`` URL: sent untouched (TokenHub fetches it);
- a ``data:`` URL: decoded once to check its type and count its tokens, and sent with the type
  its bytes are (a wrong label is corrected, a type Kimi cannot take is refused);
- a local path (or ``file://`` URL): resolved under the *media root*, checked, and read,
  base64-encoded and put in the request only when that request is about to be sent.

Checking (:func:`collect`, run when the row is prepared, so ``--dry-run`` sees it too) refuses,
naming the column and the file: a path that leaves the media root (``..``, an absolute path
elsewhere, a symbolic link out), anything but a regular file, a missing or unreadable file,
content that is not an image or video Kimi takes (the type comes from the bytes: Pillow for
images, puremagic for video containers; a file's name is never trusted), a damaged image (a
JPEG, PNG or WebP that ends early), a video for a model
that takes none, and a request that would pass the body limit.

:func:`materialize` (called by the row engine, in a thread, under the job's
:class:`ByteBudget`) reads each file once: its sha256, an optional downscale to
``max_image_side``, base64 into the request bytes. Neither the bytes nor the base64 ever reach
the journal or the output: a row keeps, per item, its path, type, sizes and sha256.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import functools
import hashlib
import io
import os
import secrets
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import puremagic
from PIL import Image

from ..tokens import URL_MEDIA_TOKENS, image_tokens, video_tokens

# What Kimi takes, as the MIME type in a data URL.
IMAGE_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
# Kimi's video list names ``video/<format>`` for: mp4, mpeg, mov, avi, x-flv, mpg, webm, wmv, 3gpp.
_VIDEO_BY_MIME = {
    "video/mp4": "video/mp4", "video/x-m4v": "video/mp4",
    "video/quicktime": "video/mov",
    "video/avi": "video/avi", "video/x-msvideo": "video/avi", "video/msvideo": "video/avi",
    "video/x-flv": "video/x-flv",
    "video/webm": "video/webm",
    "video/x-ms-wmv": "video/wmv", "video/x-ms-asf": "video/wmv",
    "video/mpeg": "video/mpeg", "video/dvd": "video/mpeg", "video/mp2p": "video/mpeg",
    "video/3gpp": "video/3gpp", "video/3gpp2": "video/3gpp",
}
_VIDEO_BY_EXT = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/mov", ".avi": "video/avi", ".flv": "video/x-flv",
                 ".webm": "video/webm", ".wmv": "video/wmv", ".asf": "video/wmv", ".mpg": "video/mpeg",
                 ".mpeg": "video/mpeg", ".vob": "video/mpeg", ".3gp": "video/3gpp", ".3ga": "video/3gpp"}
VIDEO_MIMES = frozenset(_VIDEO_BY_MIME.values()) | {"video/mpg"}
IMAGE_MIMES = frozenset(IMAGE_MIME.values())
SNIFF_BYTES = 8192
_SAVE = {"PNG": {}, "JPEG": {"quality": 90}, "WEBP": {"quality": 90}, "GIF": {}}
# One marker per process: a row's text cannot guess it, so it never collides with a prompt.
_MARK = f"batchkimi-media-{secrets.token_hex(8)}-"

# Pillow warns (and past 2x, refuses) above this many pixels; its header read costs nothing.
Image.MAX_IMAGE_PIXELS = 200_000_000


class MediaInvalid(Exception):
    """This row's media cannot be sent; the message names the column and the file. ``kind``:
    "image" or "video" when the bytes are one Kimi cannot take, else None."""

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Sniffed:
    kind: str  # image | video
    mime: str
    width: int | None = None
    height: int | None = None


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


@dataclass(frozen=True, slots=True)
class Known:
    """What a folder walk found in a file, trusted while the file's size and time are the same."""

    size: int
    mtime_ns: int
    sniffed: Sniffed | None = None
    problem: str | None = None


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


# ---- type from content ---------------------------------------------------------------------
def sniff_file(path: str) -> Sniffed:
    """The kind and Kimi MIME type of a file, from its bytes; raises MediaInvalid."""
    try:
        with open(path, "rb") as fh:
            found = _as_image(fh)
            if found is not None:
                return found
            fh.seek(0)
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        raise MediaInvalid(f"cannot be read ({exc.strerror or exc})") from None
    return _as_video(head)


def sniff_bytes(data: bytes) -> Sniffed:
    return _as_image(io.BytesIO(data)) or _as_video(data[:SNIFF_BYTES])


_TAIL_BYTES = 1024
_JPEG_EOI, _JPEG_SOS = b"\xff\xd9", b"\xff\xda"


def _whole(fh: Any, fmt: str) -> bool:
    """Whether an image file is whole: its format's end is there (a JPEG's end-of-image marker
    after its scan, a PNG's IEND chunk, a WebP's RIFF length). One read of the last KiB; the
    whole file only when a JPEG or PNG carries data after its end (a phone's motion photo).
    GIF has no end worth checking: it is taken as it is."""
    size = fh.seek(0, io.SEEK_END)
    if fmt == "WEBP":
        fh.seek(4)
        riff = fh.read(4)
        return len(riff) == 4 and size >= int.from_bytes(riff, "little") + 8
    end = {"JPEG": _JPEG_EOI, "PNG": b"IEND"}.get(fmt)
    if end is None:
        return True
    fh.seek(max(0, size - _TAIL_BYTES))
    if end in fh.read(_TAIL_BYTES):
        return True
    fh.seek(0)
    data = fh.read()
    if fmt == "PNG":
        return b"IEND" in data
    sos = data.find(_JPEG_SOS)  # 0xFFD9 cannot occur inside the scan's entropy-coded data
    return sos >= 0 and data.find(_JPEG_EOI, sos) >= 0


def _as_image(source: Any) -> Sniffed | None:
    """Pillow's reading of an image header, and a check that the file is whole; None when
    Pillow knows no such image (perhaps a video); MediaInvalid (kind "image") for an image Kimi
    does not take or a damaged one."""
    try:
        with Image.open(source) as img:
            fmt = img.format or "unknown"
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise MediaInvalid(f"is too large an image to read ({exc})", kind="image") from None
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError):
        return None
    mime = IMAGE_MIME.get(fmt)
    if mime is not None:
        if not _whole(source, fmt):
            raise MediaInvalid(f"is a damaged {fmt} image (it ends early: a cut download or copy?)", kind="image")
        return Sniffed("image", mime, int(width), int(height))
    if fmt == "MPEG":  # Pillow reads MPEG video frames too: a video container, then
        return None
    raise MediaInvalid(f"is a {fmt} image; Kimi takes png, jpeg, webp and gif", kind="image")


def _as_video(head: bytes) -> Sniffed:
    if not head:
        raise MediaInvalid("is empty")
    try:
        guesses = puremagic.magic_string(head)
    except (puremagic.PureError, ValueError):
        guesses = []
    found = [m for g in guesses if (m := _VIDEO_BY_MIME.get(g.mime_type) or _VIDEO_BY_EXT.get(g.extension.lower()))]
    if found:
        # ISO media files (mp4, mov, 3gp) share one container, and puremagic offers several
        # names for them; its first guess is right but for 3GP, which it ranks below mp4. The
        # major brand in the file's ftyp box decides between the names it offered.
        brand_3gp = head[4:8] == b"ftyp" and head[8:11] in (b"3gp", b"3g2")
        return Sniffed("video", "video/3gpp" if brand_3gp and "video/3gpp" in found else found[0])
    seen = next((g.mime_type or g.name for g in guesses if g.mime_type or g.name), None)
    what = f"its content looks like {seen}" if seen else "its content is not a known image or video format"
    kind = "video" if seen and (seen.startswith("video/") or "matroska" in seen) else None
    raise MediaInvalid(f"is not an image or video Kimi takes ({what})", kind=kind)


def inspect(path: str) -> tuple[str, dict[str, Any]] | None:
    """A folder walk's look at a file: (kind, what to remember of it) for an image or video,
    None for anything else. A file that is an image or video Kimi cannot take (a BMP, an mkv)
    is kept with its problem, so that its row says why."""
    try:
        s = sniff_file(path)
    except MediaInvalid as exc:
        return (exc.kind, {"problem": str(exc)}) if exc.kind is not None else None
    found: dict[str, Any] = {"mime": s.mime}
    if s.width is not None:
        found.update(width=s.width, height=s.height)
    return s.kind, found


def known_from(entry: Mapping[str, Any]) -> Known | None:
    """The :class:`Known` a folder index line records, if it records one."""
    try:
        if entry.get("problem"):
            return Known(int(entry["size"]), int(entry["mtime_ns"]), problem=str(entry["problem"]))
        if entry.get("mime"):
            w, h = entry.get("width"), entry.get("height")
            sniffed = Sniffed(str(entry["kind"]), str(entry["mime"]), int(w) if w else None, int(h) if h else None)
            return Known(int(entry["size"]), int(entry["mtime_ns"]), sniffed)
    except (KeyError, TypeError, ValueError):
        pass
    return None


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
def _local_ref(ref: str) -> str | None:
    """The path a reference names, or None for a URL sent as it is."""
    low = ref[:8].lower()
    if low.startswith(("http://", "https://", "data:")):
        return None
    if low.startswith("file://"):
        parsed = urllib.parse.urlsplit(ref)
        if parsed.netloc not in ("", "localhost"):
            raise MediaInvalid(f"{ref!r} names a file on another host")
        return urllib.parse.unquote(parsed.path)
    if "://" in ref[:16]:
        raise MediaInvalid(f"{ref!r}: only http(s), data and file URLs, or local paths, are understood")
    return ref


def resolve(ref: str, root: Path, dirs: dict[str, str] | None = None) -> tuple[str, os.stat_result]:
    """``ref`` as a regular file inside ``root``: its real path (symbolic links followed, then
    checked) and its stat. ``dirs`` caches the real path of folders (many files share one)."""
    root_s = str(root)
    prefix = root_s if root_s.endswith(os.sep) else root_s + os.sep
    name_ = os.path.expanduser(ref) if ref.startswith("~") else ref
    target = name_ if os.path.isabs(name_) else os.path.join(root_s, name_)
    head, name = os.path.split(target)
    if name in ("", ".", "..") or dirs is None:
        real = os.path.realpath(target)  # every link that exists followed; "..", "." gone
    else:
        real_head = dirs.get(head)
        if real_head is None:
            if len(dirs) > 10_000:
                dirs.clear()
            real_head = dirs[head] = os.path.realpath(head)
        real = os.path.join(real_head, name)
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.lstat(real).st_mode):
                real = os.path.realpath(real)
    if not real.startswith(prefix):  # before existence: a dataset learns nothing of other folders
        raise MediaInvalid(f"{ref!r} is outside the media root {root}; "
                           "set media_root to a folder that holds it, if that is intended")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise MediaInvalid(f"{ref!r} does not exist (looked for {target})") from None
    except OSError as exc:
        raise MediaInvalid(f"{ref!r} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise MediaInvalid(f"{ref!r} is not a regular file")
    return real, st


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
            local = _local_ref(ref)
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


# ---- at send time --------------------------------------------------------------------------
def read_item(item: MediaItem, max_side: int | None) -> tuple[bytes | None, dict[str, Any]]:
    """The bytes to send for a file item, or one whose bytes are in the row (None when it goes by
    URL), and its output record."""
    if item.inline is not None:
        data = item.inline
    else:
        assert item.path is not None
        try:
            with open(item.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise MediaInvalid(f"{item.where}: {item.ref!r} cannot be read any more ({exc.strerror or exc})") from None
    sha = hashlib.sha256(data).hexdigest()
    if item.size_bytes is not None and len(data) != item.size_bytes:
        raise MediaInvalid(f"{item.where}: {item.ref!r} changed while the job ran ({item.size_bytes} bytes when "
                           f"checked, {len(data)} when read): run again to send it as it is now")
    if item.source == "url":
        return None, item.record(sha256=sha)
    sent_w, sent_h = item.width, item.height
    if item.kind == "image" and item.width and item.height and (item.send_width, item.send_height) != (item.width, item.height):
        data, (sent_w, sent_h) = _downscale(data, (item.send_width or 1, item.send_height or 1), item)
    return data, item.record(sha256=sha, sent_bytes=len(data)) | {"sent_width": sent_w, "sent_height": sent_h}


def _downscale(data: bytes, size: tuple[int, int], item: MediaItem) -> tuple[bytes, tuple[int, int]]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "PNG"
            small = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
            if fmt == "JPEG" and small.mode not in ("RGB", "L", "CMYK"):
                small = small.convert("RGB")
            out = io.BytesIO()
            small.save(out, format=fmt, **_SAVE.get(fmt, {}))
            return out.getvalue(), small.size
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaInvalid(f"{item.where}: {item.ref!r} cannot be decoded to downscale it ({exc})") from None


def materialize(payload: bytes, items: tuple[MediaItem, ...], max_side: int | None,
                max_request_bytes: int) -> tuple[bytes, list[dict[str, Any]]]:
    """The request bytes with every file placeholder filled, and each item's record."""
    pieces: list[bytes] = []
    records: list[dict[str, Any]] = []
    rest_at = 0
    for item in items:
        if item.path is None and item.inline is None:
            records.append(item.record())
            continue
        data, record = read_item(item, max_side)
        records.append(record)
        if data is None or item.marker is None:
            continue
        marker = item.marker.encode()
        at = payload.index(marker, rest_at)
        pieces.append(payload[rest_at:at])
        pieces.append(f"data:{item.mime};base64,".encode())
        pieces.append(base64.b64encode(data))
        del data
        rest_at = at + len(marker)
    pieces.append(payload[rest_at:])
    out = b"".join(pieces)
    if len(out) > max_request_bytes:
        raise MediaInvalid(f"the request is {len(out):,} bytes, over the {max_request_bytes:,}-byte limit "
                           "(set max_image_side to send smaller images, or send fewer items per row)")
    return out, records


def with_marker_note(body: Any, items: tuple[MediaItem, ...]) -> Any:
    """``body`` for display: each placeholder replaced by what will be sent in its place."""
    notes = {i.marker: f"data:{i.mime};base64,<{i.ref}: {i.size_bytes:,} bytes, read when sent>"
             for i in items if i.marker is not None}
    if not notes:
        return body

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return notes.get(v, v) if isinstance(v, str) else v

    return walk(body)


# ---- the budget of bytes in flight -----------------------------------------------------------
class ByteBudget:
    """Request bytes held at once, job-wide: a row waits here before its files are read. A row
    bigger than the whole budget goes alone. First come, first served."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = max(1, int(limit_bytes))
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    async def acquire(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self._take(n)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as we were cancelled: give it back
            else:
                with contextlib.suppress(ValueError):  # already dropped by _wake, as a cancelled future
                    self._waiters.remove(entry)
                self._wake()
            raise

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._take(n)
            fut.set_result(None)


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
