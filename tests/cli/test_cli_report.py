"""The HTML report: self-contained, every image a PNG that decodes, written atomically; and
rendered in headless Chromium (where installed) with every image loaded."""

from __future__ import annotations

import base64
import json
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


_CHROMIUM = next((c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)),
                 None)


@pytest.mark.skipif(_CHROMIUM is None, reason="headless Chromium is not installed")
def test_every_image_loads_in_chromium(report_dir: Path, tmp_path: Path) -> None:
    # a test-only probe appended to a copy: it records how many images decoded
    probe = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.body.setAttribute('data-probe',i.length+':'+i.filter(x=>x.complete&&"
             "x.naturalWidth>0).length)});</script>")
    page = tmp_path / "probe.html"
    page.write_text((report_dir / "report.html").read_text().replace("</body>", probe + "</body>"))
    assert _CHROMIUM is not None
    proc = subprocess.run([_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r'data-probe="(\d+):(\d+)"', proc.stdout)
    assert m, proc.stderr[-500:]
    assert m.group(1) == m.group(2) == "4"
