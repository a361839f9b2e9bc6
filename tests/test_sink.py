"""The output directory on its own: journal recovery, atomic parts, compaction."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from batchkimi.output.sink import Sink, read_results


def row(pos: int, status: str = "ok", **kw) -> dict:  # noqa: ANN003
    return {"id": f"r{pos}", "row": pos, "status": status, "content": f"answer {pos}", "attempts": 1,
            "finished_at": int(time.time() * 1000), **kw}


def test_a_killed_runs_journal_becomes_a_part_and_a_torn_line_is_dropped(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "out", keep_columns=("text",))
    sink.prepare()
    sink.append([row(0, text="a"), row(1, text="b")])
    with open(sink.journal.segment_path(sink.journal.seq), "ab") as seg:
        seg.write(b'{"id": "r2", "row": 2, "sta')  # the crash tore this line
    sink.unlock()  # the process died: the OS drops its lock
    # a new process opens the same directory
    again = Sink(tmp_path / "out", keep_columns=("text",))
    again.prepare()
    state = again.compact(3)
    df = pd.read_parquet(tmp_path / "out")
    assert sorted(df["id"]) == ["r0", "r1"] and list(df.columns)[-1] == "text"
    assert state.done.tolist() == [True, True, False] and state.first_pending() == 2
    assert not list((tmp_path / "out/_journal").iterdir())


def test_newer_rows_supersede_older_ones_on_compaction(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "out")
    sink.prepare()
    sink.append([row(0), row(1, "error", error_type="http_error"), row(2, "error")])
    sink.roll()
    sink.append([row(1, "ok")])
    sink.roll()
    assert len(pd.read_parquet(tmp_path / "out")) == 4  # before compaction, mid-run
    assert len(read_results(tmp_path / "out")) == 3  # read_results already keeps the newest
    state = sink.compact(3)
    df = pd.read_parquet(tmp_path / "out").sort_values("row")
    assert list(df["status"]) == ["ok", "ok", "error"]
    assert state.status_counts() == {"ok": 2, "error": 1} and state.done.tolist() == [True, True, False]
    assert sink.status_counts(below=2) == {"ok": 2}


def test_manifest_round_trip_and_no_temporary_files_left(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "out")
    sink.prepare()
    sink.write_manifest({"a": 1})
    sink.append([row(0)])
    sink.roll()
    assert sink.read_manifest() == {"a": 1}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "_journal", "_manifest.json", "part-000001.parquet"]
    assert json.loads((tmp_path / "out/_manifest.json").read_text()) == {"a": 1}
