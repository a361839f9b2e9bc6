"""An incremental Server-Sent Events decoder: bytes in, ``data`` payloads (bytes) out. No I/O.

Feed it whatever the socket gave, in any cut; it returns the complete events' data.
It follows the SSE spec where real servers do, and tolerates what they do instead:

- lines end in LF, CR or CRLF, and a CRLF may be split across two reads;
- ``data:value`` and ``data: value`` (one leading space is dropped, as the spec says);
- comment lines (``: keep-alive``) and ``event:``/``id:``/``retry:`` fields are skipped;
- several ``data:`` lines in one event are joined with ``\\n``;
- a line of any length (real Kimi chunks pass 128 KiB; aiohttp's readline would raise);
- a last event not followed by a blank line is returned by :meth:`close`;
- a UTF-8 byte-order mark before the first byte is skipped.

Example::

    dec = SSEDecoder()
    dec.feed(b'data: {"a":1}\\n\\nda')   # -> [b'{"a":1}']
    dec.feed(b'ta: [DONE]\\n\\n')        # -> [b'[DONE]']
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"


class SSEDecoder:
    __slots__ = ("_buf", "_data", "_pending_cr", "_started")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] | None = None
        self._pending_cr = False
        self._started = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add bytes; return the data of every event they completed."""
        if not chunk:
            return []
        # The common read, a stream's pace: exactly one whole "data: ...\n\n" event, nothing
        # carried over. Same answer as the general path below, for a third of the work.
        if (self._started and not self._buf and not self._pending_cr and chunk[:6] == b"data: "
                and chunk.find(b"\n", 6) == len(chunk) - 2 and chunk[-1:] == b"\n" and b"\r" not in chunk):
            return [chunk[6:-2]]
        if not self._started:
            # The BOM may itself arrive in pieces: wait until three bytes are here.
            head = self._buf + chunk
            if len(head) < 3 and _BOM.startswith(head):
                self._buf = head
                return []
            self._started = True
            if head.startswith(_BOM):
                self._buf, chunk = b"", head[3:]
            else:
                self._buf, chunk = b"", head
            if not chunk:
                return []
        if self._pending_cr:
            # The previous read ended in CR: a LF now is the rest of that CRLF.
            self._pending_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                self._pending_cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        if b"\n\n" not in buf:
            self._buf = buf
            return []
        # Whole events only: everything up to the last blank line; the rest waits.
        events = buf.split(b"\n\n")
        self._buf = events.pop()
        out: list[bytes] = []
        for event in events:
            # fast path: one "data:" line, by far the commonest event
            if event[:5] == b"data:" and b"\n" not in event:
                out.append(event[6:] if event[5:6] == b" " else event[5:])
            elif event:
                for line in event.split(b"\n"):
                    self._line(line, out)
                self._line(b"", out)
        return out

    def close(self) -> list[bytes]:
        """End of input: return an event that was complete but for its blank line."""
        out: list[bytes] = []
        for line in self._buf.split(b"\n") if self._buf else ():
            self._line(line, out)
        self._buf = b""
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if not line:
            if self._data is not None:
                data = self._data
                out.append(data[0] if len(data) == 1 else b"\n".join(data))
                self._data = None
            return
        if line.startswith(b"data"):
            rest = line[4:]
            if not rest:
                value = b""
            elif rest[:1] == b":":
                value = rest[2:] if rest[1:2] == b" " else rest[1:]
            else:
                return  # a field named e.g. "dataset": not ours
            if self._data is None:
                self._data = [value]
            else:
                self._data.append(value)
        # ":" comments, event:, id:, retry: and unknown fields are ignored.
