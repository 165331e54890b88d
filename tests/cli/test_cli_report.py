"""The HTML report: self-contained, every image a PNG that decodes, written atomically; and
rendered in headless Chromium with every image decoded, every table laid out and a screenshot
that is not blank. Without a browser the Chromium tests skip, except in CI (CI=true), where
they fail: .ci/run installs Debian's chromium package."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import graphsurg as gs
from graphsurg._report import ModelReport, Report, write_atomic
from graphsurg._zoo import dead_mlp


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = dead_mlp(0, n_batches=2)
    d = gs.diagnose(case.model, case.batches, loss_fn=case.loss_fn,
                    config=gs.DiagnoseConfig(progress=False))
    mr = ModelReport("dead_mlp", case.description, before=d, after=d,
                     plan=[{"problem": "DeadNeurons", "site": "0:relu", "replacement": "reinit_dead",
                            "scale": "neuron", "guarantee": "exact", "evidence": "x", "kept": True}],
                     metrics=[("problems", "2", "0")],
                     curves={"untreated": [1.0, 0.5, 0.4], "treated": [0.3, 0.2]},
                     curve_offsets={"treated": 1})
    out = tmp_path_factory.mktemp("report")
    Report("test report <&>", [mr], meta={"version": gs.__version__}).write(out)
    return out


def test_self_contained_with_decodable_pngs(report_dir: Path) -> None:
    text = (report_dir / "report.html").read_text()
    assert "test report &lt;&amp;&gt;" in text  # escaped
    assert not re.search(r'(src|href)="(?!data:|#)', text)  # no external resources
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(imgs) == 4  # dead fraction, grad norm, curves, variance strip
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((report_dir / "report.json").read_text())
    assert data["models"][0]["before"]["format"] == "graphsurg.diagnosis/1"
    assert not list(report_dir.glob(".*tmp"))  # no temporaries left


def test_write_atomic_keeps_old_file_on_failure(tmp_path: Path) -> None:
    p = tmp_path / "f.txt"
    write_atomic(p, "old")
    with pytest.raises(TypeError):
        write_atomic(p, 3)  # type: ignore[arg-type]
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["f.txt"]


_BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# No first-run UI, no network traffic of the browser's own (updates, sync, QUIC probes): the
# page is a local file and the run must not depend on the machine's network.
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--hide-scrollbars", "--virtual-time-budget=5000")
# appended to a copy of the page: counts the images that decoded and the tables that laid out
# with visible rows, after the load event
_PROBE = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
          "const t=[...document.querySelectorAll('table')];"
          "const ok=x=>x.rows.length>0&&x.getBoundingClientRect().height>0&&"
          "x.innerText.trim().length>0;"
          "document.body.setAttribute('data-probe',[i.length,i.filter(x=>x.complete&&"
          "x.naturalWidth>0&&x.naturalHeight>0).length,t.length,t.filter(ok).length].join(':'))"
          "});</script>")


def _chromium() -> str:
    """The browser's path; a skip on a machine without one, a failure in CI (CI=true), where
    .ci/run installs it."""
    path = next((p for c in _BROWSERS if (p := shutil.which(c))), None)
    if path is None:
        msg = "headless Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{msg}; CI must run the browser test (.ci/run installs it)")
        pytest.skip(msg)
    return path


def _browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # fresh each run
    return subprocess.run([_chromium(), *_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=90)


def _probe(tmp_path: Path, html_text: str) -> tuple[int, int, int, int]:
    """(images, images decoded, tables, tables rendered) of ``html_text`` in Chromium."""
    page = tmp_path / "probe.html"
    page.write_text(html_text.replace("</body>", _PROBE + "</body>"))
    proc = _browser(tmp_path, "--dump-dom", page.as_uri())
    m = re.search(r'data-probe="(\d+):(\d+):(\d+):(\d+)"', proc.stdout)
    assert m, f"the probe did not run (exit {proc.returncode}): {proc.stderr[-800:]}"
    n_img, ok_img, n_tab, ok_tab = (int(g) for g in m.groups())
    return n_img, ok_img, n_tab, ok_tab


def test_every_image_and_table_renders_in_chromium(report_dir: Path, tmp_path: Path) -> None:
    text = (report_dir / "report.html").read_text()
    n_img, ok_img, n_tab, ok_tab = _probe(tmp_path, text)
    assert (n_img, n_tab) == (4, text.count("<table"))  # the browser saw all of them ...
    assert (ok_img, ok_tab) == (n_img, n_tab)  # ... and every one rendered


def test_probe_catches_a_broken_image(report_dir: Path, tmp_path: Path) -> None:
    """The probe can fail: one image with bytes that are not a PNG is counted as broken."""
    text = (report_dir / "report.html").read_text()
    broken = re.sub(r"data:image/png;base64,[^\"]+", "data:image/png;base64,bm90IGEgcG5n", text,
                    count=1)
    n_img, ok_img, _, _ = _probe(tmp_path, broken)
    assert (n_img, ok_img) == (4, 3)


def test_screenshot_is_not_blank(report_dir: Path, tmp_path: Path) -> None:
    """The page as a user sees it: a screenshot with the header, tables and plots drawn.

    A blank or failed page is one flat colour (grey-level standard deviation 0, measured on an
    empty page); this report's first screen measured 65 (60 with its images removed), so the
    bound 20 separates the two with a wide margin. The plots must be on screen too: the
    "after" colour is used only by the plots: 3274 pixels of it with the plots, 0 without
    (measured), bound 1000.
    """
    import numpy as np
    from PIL import Image  # pillow is a dependency of matplotlib, which drew the report

    from graphsurg._report import AFTER_COLOR

    shot = tmp_path / "shot.png"
    proc = _browser(tmp_path, f"--screenshot={shot}", "--window-size=1280,1400",
                    (report_dir / "report.html").as_uri())
    assert shot.exists(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-800:]}"
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (1400, 1280)
    assert img.mean(axis=2).std() > 20.0
    after = np.array([int(AFTER_COLOR[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)
    near = (np.abs(img - after).max(axis=2) <= 8).sum()  # 8/255: PNG scaling and blending
    assert near > 1000, f"{near} pixels of the plots' colour on screen"
