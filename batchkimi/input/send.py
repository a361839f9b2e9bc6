"""A request's media at the moment it is sent: each file (or the bytes in the row) read once,
its sha256 taken, an image downscaled to ``max_image_side`` when asked, and the bytes put in
the request as base64 where its placeholder stands. Neither the bytes nor the base64 ever
reach the journal or the output: a row keeps, per item, its path, type, sizes and sha256.
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Any

from PIL import Image

from .media import MediaItem
from .sniff import MediaInvalid

_SAVE = {"PNG": {}, "JPEG": {"quality": 90}, "WEBP": {"quality": 90}, "GIF": {}}

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


