"""The HTML report opened in a real browser: Debian's headless Chromium renders the page and
its DOM is checked (skipped, with the reason, where Chromium is missing; CI installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import batchkimi
from batchkimi.cli import cli
from batchkimi.config import load_job
from batchkimi.report import html as htmlreport

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def rendered(page: Path) -> str:
    """The DOM after Chromium loaded and laid out the page (no network: --dump-dom of a file)."""
    assert CHROMIUM is not None
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_the_html_report_shows_plots_accuracy_and_a_paged_contact_sheet(tmp_path: Path, simulator, monkeypatch) -> None:
    h = simulator()
    monkeypatch.setattr(htmlreport, "PER_PAGE", 5)
    cap = load_job(ROOT / "jobs" / "caption.toml", {"output": str(tmp_path / "cap"), "base_url": h.base_url})
    batchkimi.run(cap)
    page = tmp_path / "cap.html"
    r = CliRunner().invoke(cli, ["report", cap.output, "--html", str(page)])
    assert r.exit_code == 0, r.output
    raw = page.read_text()
    assert not re.search(r"""(?:src|href)=["']https?://""", raw)  # self-contained: nothing fetched
    dom = rendered(page)
    assert "Contact sheet (13 items)" in dom and "Latency" in dom and "Tokens per row" in dom
    assert dom.count("<svg") >= 2
    thumbs = re.findall(r'<img alt="([^"]+)" src="data:image/jpeg;base64,', dom)
    assert thumbs == ["images/blink.gif", "images/circle.png", "images/more/wide.jpg", "images/square.jpg", "images/triangle.webp"]
    assert "A 320x240 png image" in dom  # the caption beside its picture
    second = tmp_path / "cap-contact-2.html"
    assert "cap-contact-2.html" in dom and second.exists() and (tmp_path / "cap-contact-3.html").exists()
    # a video shows its first frame (PyAV, in the report and test extras)
    assert re.search(r'<img alt="videos/clip\.3gp" src="data:image/jpeg;base64,', rendered(second))

    demo = load_job(ROOT / "jobs" / "demo.toml", {"output": str(tmp_path / "demo"), "base_url": h.base_url})
    batchkimi.run(demo)
    page = tmp_path / "demo.html"
    assert CliRunner().invoke(cli, ["report", demo.output, "--html", str(page)]).exit_code == 0
    dom = rendered(page)
    assert re.search(r"accuracy</th><td>\d\.\d{3} \(95% CI", dom) and "Errors by type" in dom and "Errors over time" in dom
    assert "Contact sheet" not in dom  # no media, no sheet
    # a label job: its confusion matrix, and the rows behind the error counts
    assert "Confusion matrix" in dom and "Rows not ok" in dom and "macro F1" in dom


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")
def test_the_comparison_page_shows_the_gates_and_the_flipped_rows_with_both_answers(tmp_path: Path, simulator) -> None:
    from .test_release_gate import eval_job

    good, bad = simulator(accuracy=1.0, seed=1), simulator(accuracy=0.5, seed=2)
    a, b = eval_job(tmp_path, good.base_url, "a"), eval_job(tmp_path, bad.base_url, "b", prompt_template="Q: {question}")
    batchkimi.run(a)
    batchkimi.run(b)
    page = tmp_path / "pages" / "cmp.html"
    r = CliRunner().invoke(cli, ["compare", a.output, b.output, "--max-accuracy-drop", "0.05", "--html", str(page), "--json"])
    assert r.exit_code == 5
    c = __import__("json").loads(r.stdout)
    dom = rendered(page)
    assert "Warning:</b> the prompt differs between the runs" in dom and "FAIL" in dom
    wrong = c["paired"]["examples_to_wrong"]
    assert wrong and f"Now wrong ({len(wrong)} of {c['paired']['flipped_to_wrong']} shown)" in dom
    first = wrong[0]
    row = re.search(rf"<tr><td>{first}</td><td>(\d+)</td><td>(.*?)</td><td>(.*?)</td></tr>", dom, re.S)
    assert row is not None  # the expected value, the answer before (right) and after (wrong)
    assert "✓" in row.group(2) and "✗" in row.group(3)
