"""What a file's (or a data URL's) bytes are, never its name: Pillow reads an image's format and
pixel size from its header (and :func:`_whole` checks that the image is not cut short),
puremagic names a video's container. Each becomes Kimi's MIME type for it, or a
:class:`MediaInvalid` saying why Kimi cannot take it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import puremagic
from PIL import Image

from ..kimi import IMAGE_FORMATS

# What Kimi takes, as the MIME type in a data URL.
IMAGE_MIME = IMAGE_FORMATS
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
class Known:
    """What a folder walk found in a file, trusted while the file's size and time are the same."""

    size: int
    mtime_ns: int
    sniffed: Sniffed | None = None
    problem: str | None = None


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


