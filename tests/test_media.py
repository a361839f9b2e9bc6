"""Images, videos and media folders, through the simulator or a capturing server on loopback:
formats by content, URLs and data URLs passed through, the media root, the body limit, video
for k2.5, damaged files, the bytes-in-flight budget, image tokens, downscaling, and resuming
a captioned folder after files are added, changed and removed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from click.testing import CliRunner
from PIL import Image

import batchkimi
from batchkimi import api as engine
from batchkimi.api import RowEngine
from batchkimi.cli import cli
from batchkimi.config import load_job
from batchkimi.execution.row import endpoint, policy_of
from batchkimi.input.media import settings_for
from batchkimi.output.sink import read_results
from batchkimi.policy.ratelimit import RateLimiter
from batchkimi.request import build_request
from batchkimi.tokens import MESSAGE_OVERHEAD_TOKENS, estimate_text_tokens

from .conftest import TEST_KEY, fast_job, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT / "sample_data" / "media" / "videos"
PROMPT = "Describe this image in one sentence."


def picture(path: Path, size: tuple[int, int], fmt: str, *, noise: bool = False) -> Path:
    if noise:  # incompressible: the file is as big as its pixels
        img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        img = Image.new("RGB", size, (200, 30, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def answer_json(content: str = "a caption") -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion", "model": "kimi-k2.6",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}}


async def _ok(request: web.Request) -> web.Response:
    return web.json_response(answer_json())


def media_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for m in body["messages"] if isinstance(m.get("content"), list)
            for p in m["content"] if p.get("type") in ("image_url", "video_url")]


def text_tokens(prompt: str) -> int:
    return MESSAGE_OVERHEAD_TOKENS + estimate_text_tokens(prompt)


def job_for(tmp_path: Path, base_url: str, rows: list[dict[str, Any]], **kw: Any):
    data = write_jsonl(tmp_path / "data" / "rows.jsonl", rows) if (tmp_path / "data").is_dir() else None
    if data is None:
        (tmp_path / "data").mkdir()
        data = write_jsonl(tmp_path / "data" / "rows.jsonl", rows)
    kw.setdefault("prompt_template", PROMPT)
    return fast_job(tmp_path, base_url, input=str(data), thinking="disabled", stream=False, max_tokens=256, **kw)


# ---- formats -----------------------------------------------------------------------------
def test_each_image_format_goes_out_as_its_bytes_with_its_type(tmp_path: Path, raw_server) -> None:
    srv = raw_server(_ok)
    (tmp_path / "data").mkdir()
    files = {
        "a.png": picture(tmp_path / "data" / "a.png", (64, 48), "PNG"),
        "b.jpg": picture(tmp_path / "data" / "b.jpg", (70, 30), "JPEG"),
        "c.webp": picture(tmp_path / "data" / "c.webp", (28, 28), "WEBP"),
        "d.gif": picture(tmp_path / "data" / "d.gif", (15, 90), "GIF"),
    }
    job = job_for(tmp_path, srv.base_url, [{"id": name, "image": name} for name in files])
    assert batchkimi.run(job).final_status == {"ok": 4}
    sent = {r["body"]["messages"][-1]["content"][0]["text"] and media_parts(r["body"])[0]["image_url"]["url"]
            for r in srv.requests}
    for name, path in files.items():
        mime = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}[name.split(".")[1]]
        assert f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode() in sent
    df = read_results(job.output).set_index("id")
    rec = df.loc["b.jpg", "media"][0]
    assert rec["mime"] == "image/jpeg" and (rec["width"], rec["height"]) == (70, 30)
    assert rec["sha256"] == hashlib.sha256(files["b.jpg"].read_bytes()).hexdigest()
    assert rec["bytes"] == files["b.jpg"].stat().st_size and rec["source"] == "file" and rec["path"] == "b.jpg"


def test_each_video_container_is_known_by_its_bytes_not_its_name(tmp_path: Path, raw_server) -> None:
    srv = raw_server(_ok)
    (tmp_path / "data").mkdir()
    expected = {"clip.mp4": "video/mp4", "clip.mov": "video/mov", "clip.avi": "video/avi", "clip.flv": "video/x-flv",
                "clip.webm": "video/webm", "clip.wmv": "video/wmv", "clip.mpeg": "video/mpeg", "clip.3gp": "video/3gpp"}
    rows = []
    for i, name in enumerate(expected):
        shutil.copy(VIDEOS / name, tmp_path / "data" / f"v{i}.bin")  # the name says nothing
        rows.append({"id": name, "video": f"v{i}.bin"})
    job = job_for(tmp_path, srv.base_url, rows, model="kimi-k2.6")
    assert batchkimi.run(job).final_status == {"ok": 8}
    got = {}
    for r in srv.requests:
        url = media_parts(r["body"])[0]["video_url"]["url"]
        head, data = url.split(",", 1)
        got[hashlib.sha256(base64.b64decode(data)).hexdigest()] = head
    for name, mime in expected.items():
        assert got[hashlib.sha256((VIDEOS / name).read_bytes()).hexdigest()] == f"data:{mime};base64", name


def test_every_sample_image_and_video_is_captioned_by_the_simulator(tmp_path: Path, simulator) -> None:
    h = simulator()
    job = load_job(ROOT / "jobs" / "caption.toml", {"output": str(tmp_path / "out"), "base_url": h.base_url})
    summary = batchkimi.run(job)
    df = read_results(job.output)
    kinds = [m[0]["kind"] for m in df["media"]]
    assert summary.exit_code == 0 and kinds.count("image") >= 5 and kinds.count("video") == 8
    stats = h.simulator.stats_json()
    assert stats["images"] == kinds.count("image") and stats["videos"] == 8


# ---- references: URLs, data URLs, messages, the root ----------------------------------------
def test_urls_pass_untouched_and_data_urls_count_toward_the_limit(tmp_path: Path, raw_server) -> None:
    srv = raw_server(_ok)
    png = picture(tmp_path / "p.png", (40, 40), "PNG").read_bytes()
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    url = "https://cdn.example.com/cats/1.jpg?sig=a%2Fb"
    job = job_for(tmp_path, srv.base_url, [{"id": "u", "image": url}, {"id": "d", "images": [data_url, url]}])
    assert batchkimi.run(job).final_status == {"ok": 2}
    urls = sorted(p["image_url"]["url"] for r in srv.requests for p in media_parts(r["body"]))
    assert urls == sorted([url, url, data_url])
    df = read_results(job.output).set_index("id")
    assert df.loc["u", "media"][0]["source"] == "url" and df.loc["u", "media"][0]["path"] == url
    assert df.loc["d", "media"][0]["sha256"] == hashlib.sha256(png).hexdigest()

    small = job_for(tmp_path, srv.base_url, [{"id": "d", "image": data_url}], output=str(tmp_path / "o2"),
                    max_request_mb=len(data_url) / 1e6 / 2)
    before = len(srv.requests)
    s = batchkimi.run(small)
    assert s.final_status == {"invalid": 1} and len(srv.requests) == before
    assert "limit" in read_results(small.output)["error_message"][0]


def test_local_paths_inside_messages_are_read_like_columns(tmp_path: Path, raw_server) -> None:
    srv = raw_server(_ok)
    (tmp_path / "data").mkdir()
    a = picture(tmp_path / "data" / "pics" / "a.png", (30, 30), "PNG")
    b = picture(tmp_path / "data" / "pics" / "b.jpg", (30, 30), "JPEG")
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Compare these."},
        {"type": "image_url", "image_url": {"url": "pics/a.png", "detail": "high"}},
        {"type": "image_url", "image_url": f"file://{b}"},  # the bare-string form, as a file URL
    ]}]
    job = job_for(tmp_path, srv.base_url, [{"id": "m", "messages": messages}], prompt_template=None)
    assert batchkimi.run(job).final_status == {"ok": 1}
    parts = media_parts(srv.requests[0]["body"])
    assert parts[0]["image_url"] == {"url": "data:image/png;base64," + base64.b64encode(a.read_bytes()).decode(), "detail": "high"}
    assert parts[1]["image_url"]["url"] == "data:image/jpeg;base64," + base64.b64encode(b.read_bytes()).decode()


def test_paths_that_leave_the_media_root_are_refused_and_the_job_goes_on(tmp_path: Path, simulator) -> None:
    h = simulator()
    (tmp_path / "data").mkdir()
    secret = picture(tmp_path / "secret.png", (20, 20), "PNG")  # outside data/
    picture(tmp_path / "data" / "fine.png", (20, 20), "PNG")
    (tmp_path / "data" / "link.png").symlink_to(secret)
    (tmp_path / "data" / "inner.png").symlink_to(tmp_path / "data" / "fine.png")  # a link that stays inside: fine
    (tmp_path / "data" / "adir.png").mkdir()
    rows = [{"id": "up", "image": "../secret.png"}, {"id": "abs", "image": str(secret)}, {"id": "link", "image": "link.png"},
            {"id": "home", "image": "~/.ssh/id_rsa"}, {"id": "dir", "image": "adir.png"},
            {"id": "ok", "image": "fine.png"}, {"id": "ok2", "image": "inner.png"}, {"id": "none", "image": "nope.png"}]
    job = job_for(tmp_path, h.base_url, rows)
    report = engine.dry_run(job)
    assert report.status == {"invalid": 6, "to_send": 2}
    summary = batchkimi.run(job)
    assert summary.final_status == {"ok": 2, "invalid": 6}
    assert h.simulator.stats_json()["requests"] == 2
    df = read_results(job.output).set_index("id")
    for rid in ("up", "abs", "link", "home"):
        assert "outside the media root" in df.loc[rid, "error_message"], rid
    assert "not a regular file" in df.loc["dir", "error_message"]
    assert "does not exist" in df.loc["none", "error_message"] and "column 'image'" in df.loc["none", "error_message"]
    # the root can be widened on purpose
    wide = job_for(tmp_path, h.base_url, rows[1:2], output=str(tmp_path / "o2"), media_root=str(tmp_path))
    assert batchkimi.run(wide).final_status == {"ok": 1}


def test_a_request_over_100_mb_is_refused_before_it_is_sent(tmp_path: Path, simulator) -> None:
    h = simulator()
    (tmp_path / "data").mkdir()
    big = picture(tmp_path / "data" / "big.png", (16, 16), "PNG")
    with open(big, "r+b") as fh:
        fh.truncate(80_000_000)  # sparse: a PNG header, then 80 MB (107 MB as base64)
    picture(tmp_path / "data" / "small.png", (16, 16), "PNG")
    job = job_for(tmp_path, h.base_url, [{"id": "big", "image": "big.png"}, {"id": "small", "image": "small.png"}])
    report = engine.dry_run(job)
    assert report.status == {"invalid": 1, "to_send": 1} and "100 MB limit" in report.invalid_examples[0]
    assert batchkimi.run(job).final_status == {"ok": 1, "invalid": 1}
    assert h.simulator.stats_json()["requests"] == 1


def test_video_is_refused_for_k25_by_the_client_and_by_the_simulator(tmp_path: Path, simulator) -> None:
    h = simulator()
    (tmp_path / "data").mkdir()
    shutil.copy(VIDEOS / "clip.mp4", tmp_path / "data" / "clip.mp4")
    job = job_for(tmp_path, h.base_url, [{"id": "v", "video": "clip.mp4"}], model="kimi-k2.5")
    report = engine.dry_run(job)
    assert report.status == {"invalid": 1} and "kimi-k2.5 takes no video" in report.invalid_examples[0]
    assert batchkimi.run(job).final_status == {"invalid": 1} and h.simulator.stats_json()["requests"] == 0
    assert batchkimi.run(job.replace(model="kimi-k2.6", output=str(tmp_path / "o2"))).final_status == {"ok": 1}

    video = "data:video/mp4;base64," + base64.b64encode((VIDEOS / "clip.mp4").read_bytes()).decode()
    body = {"model": "kimi-k2.5", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "video_url", "video_url": {"url": video}}]}]}
    status, answer = asyncio.run(_post(h.base_url, body))
    assert status == 400 and "does not support video" in json.dumps(answer)


async def _post(base_url: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {TEST_KEY}"}) as r:
            return r.status, await r.json(content_type=None)


def test_damaged_unsupported_and_misnamed_files(tmp_path: Path, simulator) -> None:
    h = simulator()
    d = tmp_path / "data"
    d.mkdir()
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))  # a PNG signature, then garbage
    (d / "notes.jpg").write_text("just some text, not a picture\n" * 20)
    picture(d / "old.bmp", (20, 20), "BMP")
    picture(d / "really_a_jpeg.png", (42, 28), "JPEG")  # named png, is jpeg: sent as what it is
    shutil.copy(VIDEOS / "clip.mp4", d / "clip.mp4")
    (d / "empty.png").write_bytes(b"")
    rows = [{"id": "broken", "image": "broken.png"}, {"id": "text", "image": "notes.jpg"}, {"id": "bmp", "image": "old.bmp"},
            {"id": "misnamed", "image": "really_a_jpeg.png"}, {"id": "video_as_image", "image": "clip.mp4"},
            {"id": "empty", "image": "empty.png"}, {"id": "number", "image": 7}]
    job = job_for(tmp_path, h.base_url, rows)
    report = engine.dry_run(job)
    assert report.status == {"invalid": 6, "to_send": 1}
    assert all(line.startswith("line ") for line in report.invalid_examples)  # each names its row
    assert batchkimi.run(job).final_status == {"ok": 1, "invalid": 6}
    df = read_results(job.output).set_index("id")
    assert "not an image or video Kimi takes" in df.loc["broken", "error_message"]
    assert "not an image or video Kimi takes" in df.loc["text", "error_message"]
    assert "BMP image; Kimi takes png, jpeg, webp and gif" in df.loc["bmp", "error_message"]
    assert "holds a video (video/mp4), not an image" in df.loc["video_as_image", "error_message"]
    assert "is empty" in df.loc["empty", "error_message"]
    assert "column 'image' must be a path or URL" in df.loc["number", "error_message"]
    assert df.loc["misnamed", "media"][0]["mime"] == "image/jpeg"


def test_the_simulator_refuses_what_kimi_refuses_in_media_parts(simulator) -> None:
    h = simulator(max_body_bytes=200_000, body_too_large_status=413)
    png = io.BytesIO()
    Image.new("RGB", (10, 10)).save(png, "PNG")
    good = base64.b64encode(png.getvalue()).decode()

    def body(url: Any, kind: str = "image_url") -> dict[str, Any]:
        return {"model": "kimi-k2.6", "messages": [{"role": "user", "content": [{"type": kind, kind: {"url": url}}]}]}

    cases = [
        (body("data:image/bmp;base64," + good), 400, "unsupported image format"),
        (body("data:image/png;base64,@@@not-base64"), 400, "not valid base64"),
        (body("data:image/png;base64," + base64.b64encode(b"garbage" * 10).decode()), 400, "cannot be decoded"),
        (body("/etc/passwd"), 400, "unsupported image url"),
        (body("data:video/mkv;base64," + good, "video_url"), 400, "unsupported video format"),
        (body("data:image/png;base64," + "A" * 300_000), 413, "exceeds"),
    ]
    for request, status, words in cases:
        got, answer = asyncio.run(_post(h.base_url, request))
        assert got == status and words in json.dumps(answer), (words, got, answer)
    got, answer = asyncio.run(_post(h.base_url, body("data:image/png;base64," + good)))
    assert got == 200 and answer["usage"]["prompt_tokens"] == MESSAGE_OVERHEAD_TOKENS + 1  # 10x10: floor(10/14)^2 -> at least 1


# ---- tokens, budget, downscaling --------------------------------------------------------
def test_image_tokens_are_reserved_and_charged_by_14_pixel_tiles(tmp_path: Path, simulator) -> None:
    h = simulator()
    (tmp_path / "data").mkdir()
    sizes = {"a.png": (512, 512), "b.png": (1024, 300), "c.png": (13, 800)}
    for name, size in sizes.items():
        picture(tmp_path / "data" / name, size, "PNG")
    job = job_for(tmp_path, h.base_url, [{"id": n, "image": n} for n in sizes])
    media = settings_for(job, Path(job.input))
    reserved: list[int] = []

    class Recording(RateLimiter):
        async def acquire(self, tokens: int):  # type: ignore[override]
            reserved.append(tokens)
            return await super().acquire(tokens)

    async def go() -> list[dict[str, Any]]:
        async with endpoint(job, TEST_KEY) as transport:
            eng = RowEngine(job, transport, Recording(concurrency=2, tpm=10_000_000), policy_of(job))
            rows = []
            for i, (name, _size) in enumerate(sizes.items()):
                rows.append(await eng.process(name, i, build_request({"image": name}, job, media=media)))
            return rows

    rows = asyncio.run(go())
    for (name, (w, hgt)), tokens, row in zip(sizes.items(), reserved, rows, strict=True):
        expected = text_tokens(PROMPT) + max(1, (w // 14) * (hgt // 14))
        assert tokens == expected, name  # the TPM reservation
        assert row["prompt_tokens"] == expected, name  # what the simulator charged


def test_downscaling_sends_the_smaller_image_and_records_its_size(tmp_path: Path, raw_server) -> None:
    srv = raw_server(_ok)
    (tmp_path / "data").mkdir()
    picture(tmp_path / "data" / "wide.jpg", (2000, 1000), "JPEG")
    picture(tmp_path / "data" / "small.png", (300, 200), "PNG")
    job = job_for(tmp_path, srv.base_url, [{"id": "w", "image": "wide.jpg"}, {"id": "s", "image": "small.png"}],
                  max_image_side=500)
    report = engine.dry_run(job)
    assert report.prompt_tokens_estimate == 2 * text_tokens(PROMPT) + (500 // 14) * (250 // 14) + (300 // 14) * (200 // 14)
    assert batchkimi.run(job).final_status == {"ok": 2}
    sizes = sorted(Image.open(io.BytesIO(base64.b64decode(media_parts(r["body"])[0]["image_url"]["url"].split(",")[1]))).size
                   for r in srv.requests)
    assert sizes == [(300, 200), (500, 250)]
    rec = read_results(job.output).set_index("id").loc["w", "media"][0]
    assert (rec["width"], rec["height"], rec["sent_width"], rec["sent_height"]) == (2000, 1000, 500, 250)
    assert rec["sent_bytes"] < rec["bytes"]


def test_the_bytes_in_flight_budget_holds(tmp_path: Path, simulator) -> None:
    h = simulator(latency_ms=150)
    (tmp_path / "data").mkdir()
    for i in range(10):
        picture(tmp_path / "data" / f"n{i}.png", (250, 250), "PNG", noise=True)  # ~190 KB, ~250 KB as base64
    rows = [{"id": f"n{i}", "image": f"n{i}.png"} for i in range(10)]
    job = job_for(tmp_path, h.base_url, rows, concurrency=10, max_mb_in_flight=0.6)
    assert batchkimi.run(job).final_status == {"ok": 10}
    held = h.simulator.stats_json()["peak_body_bytes_in_flight"]
    assert 250_000 < held <= 600_000
    # the same job without a tight budget holds them all at once: the check above can fail
    h.simulator.reset_stats()
    loose = job.replace(output=str(tmp_path / "o2"), max_mb_in_flight=256.0)
    assert batchkimi.run(loose).final_status == {"ok": 10}
    assert h.simulator.stats_json()["peak_body_bytes_in_flight"] > 1_500_000


def test_a_file_gone_by_send_time_is_an_error_row_and_nothing_is_sent(tmp_path: Path, simulator) -> None:
    h = simulator()
    (tmp_path / "data").mkdir()
    path = picture(tmp_path / "data" / "a.png", (30, 30), "PNG")
    job = job_for(tmp_path, h.base_url, [{"id": "a", "image": "a.png"}])
    prepared = build_request({"image": "a.png"}, job, media=settings_for(job, Path(job.input)))
    path.unlink()

    async def go() -> dict[str, Any]:
        async with RowEngine.create(job, TEST_KEY) as eng:
            return await eng.process("a", 0, prepared)

    row = asyncio.run(go())
    assert row["status"] == "error" and row["error_type"] == "media_unreadable" and "a.png" in row["error_message"]
    assert h.simulator.stats_json()["requests"] == 0


def test_no_base64_reaches_the_journal_or_the_output(tmp_path: Path, simulator) -> None:
    h = simulator()
    (tmp_path / "data").mkdir()
    img = picture(tmp_path / "data" / "a.png", (200, 200), "PNG", noise=True)
    job = job_for(tmp_path, h.base_url, [{"id": "a", "image": "a.png"}], keep_columns=("image",))
    assert batchkimi.run(job).final_status == {"ok": 1}
    needle = base64.b64encode(img.read_bytes())[1000:1100]
    for f in Path(job.output).rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            if f.suffix == ".parquet":
                data = json.dumps(pq.read_table(f).to_pylist(), default=str).encode()
            assert needle not in data, f


# ---- folders ------------------------------------------------------------------------------
def caption(folder: Path, out: Path, base_url: str, *extra: str) -> Any:
    result = CliRunner().invoke(cli, ["caption", str(folder), "--output", str(out), "--prompt", PROMPT,
                                      "--base-url", base_url, "--quiet", "--no-thinking", "--max-tokens", "256", *extra])
    return result


def test_caption_resumes_after_files_are_added_changed_and_removed(tmp_path: Path, simulator) -> None:
    h = simulator()
    photos, out = tmp_path / "photos", tmp_path / "out"
    picture(photos / "a.png", (40, 40), "PNG")
    picture(photos / "sub" / "b.jpg", (50, 20), "JPEG")
    shutil.copy(VIDEOS / "clip.webm", photos / "sub" / "c.webm")
    (photos / "readme.txt").write_text("not media")
    (photos / ".hidden.png").write_bytes((photos / "a.png").read_bytes())

    r = caption(photos, out, h.base_url)
    assert r.exit_code == 0, r.output
    assert "2 images, 1 videos; 3 new" in r.output and "skipped 1: files that are not images or videos" in r.output
    df = read_results(out)
    assert sorted(df["id"]) == ["a.png", "sub/b.jpg", "sub/c.webm"] and set(df["status"]) == {"ok"}
    assert h.simulator.stats_json()["requests"] == 3

    # nothing changed: nothing sent
    assert caption(photos, out, h.base_url).exit_code == 0 and h.simulator.stats_json()["requests"] == 3
    # a new file: only it is sent; a touched file (same bytes): not sent again
    picture(photos / "new.webp", (30, 30), "WEBP")
    os.utime(photos / "a.png", ns=(1, 1))
    r = caption(photos, out, h.base_url)
    assert r.exit_code == 0 and "1 new, 0 changed" in r.output, r.output
    assert h.simulator.stats_json()["requests"] == 4
    # a changed file is captioned again, its new row replacing the old
    picture(photos / "sub" / "b.jpg", (90, 30), "JPEG")
    r = caption(photos, out, h.base_url)
    assert "0 new, 1 changed" in r.output and h.simulator.stats_json()["requests"] == 5
    df = read_results(out).set_index("id")
    assert len(df) == 4 and df.loc["sub/b.jpg", "media"][0]["width"] == 90
    assert df.loc["sub/b.jpg", "media"][0]["sha256"] == hashlib.sha256((photos / "sub" / "b.jpg").read_bytes()).hexdigest()
    # a removed file keeps its row, marked; it is unmarked when it comes back
    kept = (photos / "a.png").read_bytes()
    (photos / "a.png").unlink()
    r = caption(photos, out, h.base_url)
    assert r.exit_code == 0 and "1 gone" in r.output and h.simulator.stats_json()["requests"] == 5
    df = read_results(out).set_index("id")
    assert len(df) == 4 and df.loc["a.png", "media_gone"] == True and df.loc["a.png", "status"] == "ok"  # noqa: E712
    assert not df.drop(index="a.png")["media_gone"].fillna(False).any()
    (photos / "a.png").write_bytes(kept)
    assert caption(photos, out, h.base_url).exit_code == 0 and h.simulator.stats_json()["requests"] == 5
    df = read_results(out).set_index("id")
    assert not df["media_gone"].fillna(False).any() and len(df) == 4
    assert len(pq.read_table(out).to_pylist()) == 4  # one row per file in the parts themselves


def test_caption_include_exclude_url_prefix_and_a_job_file_folder(tmp_path: Path, raw_server) -> None:
    srv = raw_server(_ok)
    photos = tmp_path / "photos"
    picture(photos / "keep" / "a b.png", (30, 30), "PNG")
    picture(photos / "keep" / "raw.jpg", (30, 30), "JPEG")
    picture(photos / "skip" / "c.png", (30, 30), "PNG")
    r = caption(photos, tmp_path / "out", srv.base_url, "--include", "keep/*", "--exclude", "*.jpg",
                "--media-url-prefix", "https://cdn.example.com/photos/")
    assert r.exit_code == 0, r.output
    assert [media_parts(x["body"])[0]["image_url"]["url"] for x in srv.requests] == ["https://cdn.example.com/photos/keep/a%20b.png"]
    rec = read_results(tmp_path / "out")["media"][0][0]
    assert rec["source"] == "url" and rec["sha256"] == hashlib.sha256((photos / "keep" / "a b.png").read_bytes()).hexdigest()

    job_file = tmp_path / "cap.toml"
    job_file.write_text(f'input = "photos"\noutput = "out2"\nbase_url = "{srv.base_url}"\nprompt_template = "{PROMPT}"\n'
                        'thinking = "disabled"\nmax_tokens = 256\nexclude = ["skip/*"]\n')
    summary = batchkimi.run(load_job(job_file))
    assert summary.final_status == {"ok": 2}


def test_a_folder_output_is_not_resumed_as_a_dataset(tmp_path: Path, simulator) -> None:
    h = simulator()
    picture(tmp_path / "photos" / "a.png", (30, 30), "PNG")
    assert caption(tmp_path / "photos", tmp_path / "out", h.base_url).exit_code == 0
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "hi"}])
    with pytest.raises(batchkimi.errors.OutputError, match="folder of images and videos"):
        batchkimi.run(fast_job(tmp_path, h.base_url, input=str(data)))


def test_media_columns_are_configurable_and_lists_are_read(tmp_path: Path, raw_server) -> None:
    srv = raw_server(_ok)
    (tmp_path / "data").mkdir()
    for n in "abc":
        picture(tmp_path / "data" / f"{n}.png", (28, 28), "PNG")
    job = job_for(tmp_path, srv.base_url, [{"id": "x", "photo": "a.png", "gallery": ["b.png", "c.png"], "image": "ignored"}],
                  image_columns=("photo", "gallery"))
    assert batchkimi.run(job).final_status == {"ok": 1}
    assert len(media_parts(srv.requests[0]["body"])) == 3


def test_rows_waiting_for_the_bytes_budget_are_not_read_or_sent_after_a_stop(tmp_path: Path, raw_server) -> None:
    """A budget that holds one image at a time and 1 s answers: at the stop, the other rows wait
    for the budget. None of them is sent; the one in flight finishes and is written; a rerun
    sends the rest once each."""
    holder: dict[str, Any] = {}
    seen: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        seen.append(media_parts(body)[0]["image_url"]["url"][-40:])
        if len(seen) == 1:
            holder["loop"].call_soon_threadsafe(holder["stop"].set)
        await asyncio.sleep(1.0)
        return web.json_response(answer_json())

    srv = raw_server(slow)
    (tmp_path / "data").mkdir()
    for i in range(6):
        picture(tmp_path / "data" / f"n{i}.png", (120, 120), "PNG", noise=True)  # ~43 KB each
    job = job_for(tmp_path, srv.base_url, [{"id": f"n{i}", "image": f"n{i}.png"} for i in range(6)],
                  concurrency=6, max_mb_in_flight=0.05, grace_s=5)

    async def go() -> batchkimi.Summary:
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), asyncio.Event()
        return await asyncio.wait_for(batchkimi.run_async(job, stop=holder["stop"]), 30)

    summary = asyncio.run(go())
    assert summary.interrupted and len(seen) == 1 and summary.final_status == {"ok": 1}
    again = batchkimi.run(job)
    assert again.final_status == {"ok": 6} and len(seen) == 6 and len(set(seen)) == 6


def test_video_tokens_follow_the_file_size_on_both_sides(tmp_path: Path, simulator) -> None:
    h = simulator()
    (tmp_path / "data").mkdir()
    shutil.copy(VIDEOS / "clip.mp4", tmp_path / "data" / "small.mp4")
    big = tmp_path / "data" / "big.mp4"
    big.write_bytes((VIDEOS / "clip.mp4").read_bytes() + b"\0" * 3_000_000)  # the same header, 3 MB more
    job = job_for(tmp_path, h.base_url, [{"id": "s", "video": "small.mp4"}, {"id": "b", "video": "big.mp4"}],
                  prompt_template="Summarise this video.")
    report = engine.dry_run(job)
    assert batchkimi.run(job).final_status == {"ok": 2}
    df = read_results(job.output).set_index("id")
    text = text_tokens("Summarise this video.")
    assert df.loc["s", "prompt_tokens"] == text + 1024  # at least 1,024
    assert df.loc["b", "prompt_tokens"] == text + big.stat().st_size // 1024
    assert report.prompt_tokens_estimate == df["prompt_tokens"].sum()


def test_byte_budget_is_first_come_first_served_and_never_leaks() -> None:
    from batchkimi.policy.bytes import ByteBudget

    async def go() -> None:
        b = ByteBudget(100)
        await b.acquire(60)
        order: list[str] = []

        async def take(name: str, n: int) -> None:
            await b.acquire(n)
            order.append(name)

        big = asyncio.create_task(take("big", 500))  # larger than the budget: goes alone
        small = asyncio.create_task(take("small", 10))  # fits now, but queues behind big
        gone = asyncio.create_task(take("gone", 10))
        await asyncio.sleep(0.01)
        assert order == [] and b.used == 60
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        b.release(60)
        await big
        await asyncio.sleep(0.01)
        assert order == ["big"] and b.used == 500
        b.release(500)
        await small
        assert order == ["big", "small"] and b.used == 10 and b.peak == 500
        b.release(10)
        assert b.used == 0 and not b._waiters

    asyncio.run(go())


def test_a_folder_keeps_images_kimi_cannot_take_as_invalid_rows_that_say_why(tmp_path: Path, simulator) -> None:
    h = simulator()
    photos = tmp_path / "photos"
    picture(photos / "ok.png", (30, 30), "PNG")
    picture(photos / "old.bmp", (30, 30), "BMP")
    (photos / "notes.txt").write_text("hello")
    r = caption(photos, tmp_path / "out", h.base_url, "--dry-run")
    assert r.exit_code == 0 and "invalid: old.bmp: 'old.bmp' is a BMP image" in r.output, r.output
    r = caption(photos, tmp_path / "out", h.base_url)
    assert r.exit_code == 3  # a row could not be sent
    df = read_results(tmp_path / "out").set_index("id")
    assert sorted(df.index) == ["ok.png", "old.bmp"] and df.loc["old.bmp", "status"] == "invalid"
    picture(photos / "old.bmp", (30, 30), "PNG")  # fixed in place: now a PNG under the same name
    r = caption(photos, tmp_path / "out", h.base_url)
    assert r.exit_code == 0 and read_results(tmp_path / "out").set_index("id").loc["old.bmp", "status"] == "ok"


def test_image_bytes_in_a_parquet_row_are_sent_like_files(tmp_path: Path, raw_server) -> None:
    """A Hugging Face datasets Image struct ({bytes, path}) and a plain binary column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    srv = raw_server(_ok)
    png = picture(tmp_path / "a.png", (60, 40), "PNG").read_bytes()
    jpg = picture(tmp_path / "b.jpg", (2000, 1000), "JPEG").read_bytes()
    table = pa.table({
        "id": ["hf", "raw", "none", "bad"],
        "image": pa.array([{"bytes": png, "path": "cats/a.png"}, None, {"bytes": None, "path": None},
                           {"bytes": b"not an image at all", "path": "x.png"}],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "photo": pa.array([None, jpg, None, None], pa.binary()),
        "prompt": ["Describe it."] * 4,
    })
    pq.write_table(table, tmp_path / "rows.parquet")
    job = fast_job(tmp_path, srv.base_url, input=str(tmp_path / "rows.parquet"), thinking="disabled", stream=False,
                   max_tokens=64, image_columns=("image", "photo"), max_image_side=500)
    summary = batchkimi.run(job)
    assert summary.final_status == {"ok": 3, "invalid": 1}
    urls = [p["image_url"]["url"] for r in srv.requests for p in media_parts(r["body"])]
    assert len(srv.requests) == 3 and len(urls) == 2
    assert "data:image/png;base64," + base64.b64encode(png).decode() in urls
    small = [u for u in urls if u.startswith("data:image/jpeg")]
    assert len(small) == 1 and Image.open(io.BytesIO(base64.b64decode(small[0].split(",")[1]))).size == (500, 250)
    df = read_results(job.output).set_index("id")
    rec = df.loc["hf", "media"][0]
    assert (rec["path"], rec["source"], rec["sha256"]) == ("cats/a.png", "bytes", hashlib.sha256(png).hexdigest())
    assert df.loc["raw", "media"][0]["sent_width"] == 500
    assert df.loc["none", "media"] is None or len(df.loc["none", "media"]) == 0  # an empty struct: no image, a text row
    assert "x.png is not an image or video Kimi takes" in df.loc["bad", "error_message"]
