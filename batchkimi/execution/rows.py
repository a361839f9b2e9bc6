"""One input row made ready to send, the same way whatever executes it (local or Ray).

:func:`prepare_row` gives a row's id and its request, or the message of its ``invalid`` row.
Only :class:`~batchkimi.request.RowInvalid` (the row itself cannot make a request) becomes an
``invalid`` row: an ``invalid`` row is done and never sent again, so an exception from a bug
must not become one. Any other exception goes up and stops the run, naming the row; the row
stays pending and is prepared again once the bug is fixed.
"""

from __future__ import annotations

import re
from typing import Any

from ..config import Job
from ..events import Notice
from ..input.media import MediaSettings, has_media
from ..input.reader import InputScan, SourceRow, row_id
from ..input.sniff import known_from
from ..output.results import kept_column_name, text
from ..request import Prepared, RowInvalid, build_request, thinking_budget_note

_FOLDER_COLUMN = re.compile(r"^column '(image|video)': ")


def kept_values(row: SourceRow, job: Job) -> dict[str, Any]:
    if not job.keep_columns:
        return {}
    data = row.data or {}
    return {kept_column_name(column): text(data.get(column)) for column in job.keep_columns}


def prepare_row(row: SourceRow, job: Job, fmt: str, scan: InputScan,
                media: MediaSettings | None = None, *, folder: bool = False) -> tuple[str, Prepared | str]:
    """(id, request) or (id, error message naming the place to fix). Reads the headers of the
    row's local images and videos: call it from a thread when :func:`row_has_media`. A
    ``folder`` row is a line of the media index: its id is the file's relative path."""
    if folder and row.data is not None:
        rid = str(row.data.get("id"))
        known = known_from(row.data)
        try:
            return rid, build_request(row.data, job, media=media, known={rid: known} if known is not None else None)
        except RowInvalid as exc:
            return rid, f"{rid}: {_FOLDER_COLUMN.sub('', str(exc))}"
    if row.error is not None or row.data is None:
        return f"{scan.id_prefix}{row.pos}", row.error or f"{row.where} is empty"
    found = row_id(row, fmt, job.id_column, scan.has_id_column, scan.id_prefix)
    if found is None:
        column = "custom_id" if fmt == "openai_batch" else job.id_column
        return f"{scan.id_prefix}{row.pos}", f"{row.where}: column '{column}' is missing or empty"
    rid = found
    try:
        return rid, build_request(row.data, job, batch_line=fmt == "openai_batch", media=media)
    except RowInvalid as exc:
        return rid, f"{row.where}: {exc}"


def tokens_of(row: dict[str, Any]) -> int | None:
    """An answer's tokens (None: the server reported none)."""
    if row.get("prompt_tokens") is None and row.get("completion_tokens") is None:
        return None
    return (row.get("prompt_tokens") or 0) + (row.get("completion_tokens") or 0)


def row_has_media(row: SourceRow, media: MediaSettings, job: Job) -> bool:
    return row.data is not None and has_media(row.data, media, (job.messages_column, "body"))


class LineBudgetNotes:
    """Batch lines that set their own thinking budget under Kimi's floor: the first is said at
    once, the count at the end."""

    def __init__(self, job: Job, hook: Any = None) -> None:
        self.job, self.hook = job, hook
        self.count = 0
        self.first = ""

    def check(self, prepared: Prepared, where: str) -> None:
        if prepared.body.get("max_tokens") == self.job.effective_max_tokens:
            return  # the job's own budget: said once for the job
        note = thinking_budget_note(prepared, self.job, f"the OpenAI batch line at {where}")
        if note is None:
            return
        self.count += 1
        if self.count == 1:
            self.first = note
            if self.hook is not None:
                self.hook(Notice(note))

    def lines(self) -> list[str]:
        if not self.count:
            return []
        return [f"warning: {self.first}" + (f" ({self.count:,} such lines in all)" if self.count > 1 else "")]
