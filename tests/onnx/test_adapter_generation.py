"""The ONNX adapter's model generation (issue 15, speed): one onnxruntime session per
unedited model, and no copy on a restore that has nothing to undo -- never at the price of
running or restoring a stale model."""

from __future__ import annotations

import graphsurg.passes.onnx.adapter as adapter_mod
import numpy as np
import onnx_ir as ir
import pytest
from graphsurg.passes.onnx.adapter import OnnxAdapter
from onnx import TensorProto, helper, numpy_helper

W = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
FEED = {"x": np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)}


def _adapter() -> OnnxAdapter:
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
                          [numpy_helper.from_array(W, "w")])  # fmt: skip
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    return OnnxAdapter.open(proto)[0]


def _expect(w: np.ndarray) -> np.ndarray:
    return FEED["x"].astype(np.float64) @ w.astype(np.float64)


def _set_w(model: ir.Model, w: np.ndarray) -> None:
    model.graph.initializers["w"].const_value = ir.tensor(w, name="w")


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the onnxruntime sessions the adapter builds."""
    made: list[int] = []
    real = adapter_mod.ort_session

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(adapter_mod, "ort_session", counting)
    return made


def _out(a: OnnxAdapter) -> np.ndarray:
    (y,) = a.run([FEED])
    return y.astype(np.float64)


def test_session_reused_until_an_edit(sessions: list[int]) -> None:
    a = _adapter()
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)
    assert len(sessions) == 1  # the unedited model: one session
    # an edit through a target taken before the run, made after it: never the stale session
    t = a.target([FEED])
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)
    _set_w(t.model, 2 * W)
    np.testing.assert_allclose(_out(a), _expect(2 * W), rtol=1e-6)
    # an edit through adapter.model
    _set_w(a.model, 3 * W)
    np.testing.assert_allclose(_out(a), _expect(3 * W), rtol=1e-6)
    assert len(sessions) == 4  # one per generation that ran


def test_restore_without_edit_copies_nothing_and_with_edit_undoes(sessions: list[int]) -> None:
    a = _adapter()
    base = a.snapshot(lazy=False)  # a copy (the lazy snapshot: the test below)
    working = a._model
    a.restore(base)  # nothing handed out since the snapshot: nothing to undo, no copy
    assert a._model is working and a._model is not base
    _set_w(a.target([FEED]).model, 5 * W)
    a.restore(base)  # edited: a fresh copy of the snapshot, the snapshot still usable
    assert a._model is not working and a._model is not base
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)
    _set_w(a.model, 7 * W)
    np.testing.assert_allclose(_out(a), _expect(7 * W), rtol=1e-6)
    a.restore(base)  # the restored copy edited, then restored again
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)
    np.testing.assert_allclose(base.graph.initializers["w"].const_value.numpy(), W)
    # consume: the snapshot itself becomes the working model
    a.restore(base, consume=True)
    assert a._model is base
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)


def test_restore_of_another_snapshot_is_never_skipped() -> None:
    a = _adapter()
    old = a.snapshot()
    _set_w(a.model, 2 * W)
    newer = a.snapshot()  # of the edited model
    a.restore(old)
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)
    a.restore(newer)
    np.testing.assert_allclose(_out(a), _expect(2 * W), rtol=1e-6)


def test_scratch_target_copies_on_first_access_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's target: no copy while only the diagnosis is read; once its model is
    taken, edits to it never reach the working model."""
    a = _adapter()
    clones: list[int] = []
    real = ir.Model.clone

    def counting(self: ir.Model) -> ir.Model:
        clones.append(1)
        return real(self)

    monkeypatch.setattr(ir.Model, "clone", counting)
    t = a.scratch_target([FEED])
    assert t.batches and not clones
    _set_w(t.model, 9 * W)
    assert t.model is t.model and len(clones) == 1
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)


def test_observation_session_runs_the_unchanged_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """``apply`` on a model with nothing to treat builds one session: observation's runs the
    held-out batch too (bad data there still fails); an edit after observation gets a new
    one, whose output is the edited model's."""
    import graphsurg.passes.onnx.observe as observe_mod

    from graphsurg import onnx as gso

    made: list[str] = []
    for mod in (adapter_mod, observe_mod):
        real = mod.ort_session

        def counting(*a, _real=real, _where=mod.__name__, **k):  # type: ignore[no-untyped-def]
            made.append(_where)
            return _real(*a, **k)

        monkeypatch.setattr(mod, "ort_session", counting)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                           helper.make_node("Relu", ["h"], ["y"], name="act")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
                          [numpy_helper.from_array(W, "w")])  # fmt: skip
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    data = [{"x": rng.standard_normal((16, 2)).astype(np.float32)} for _ in range(4)]
    _, result = gso.apply(proto, data)
    assert not result.applied and made == [observe_mod.__name__]
    bad = [*data[:3], {"x": np.ones((16, 3), np.float32)}]  # the held-out batch is wrong
    with pytest.raises(gso.OnnxInputError):
        gso.apply(proto, bad)

    a = _adapter()
    made.clear()
    from graphsurg._config import DiagnoseConfig

    a.observe([FEED], DiagnoseConfig())
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)
    assert made == [observe_mod.__name__]  # the observation's session ran it
    _set_w(a.model, 2 * W)
    np.testing.assert_allclose(_out(a), _expect(2 * W), rtol=1e-6)
    assert made == [observe_mod.__name__, adapter_mod.__name__]


def test_snapshot_of_a_callers_model_is_read_again_only_to_undo(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot of a model read from the caller's ModelProto, unedited, copies nothing: a
    restore with nothing to undo does nothing, one after an edit reads the proto again."""
    reads: list[int] = []
    real = adapter_mod.load_model

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        reads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(adapter_mod, "load_model", counting)
    a = _adapter()
    assert len(reads) == 1
    snap = a.snapshot()
    assert not isinstance(snap, ir.Model)  # no copy taken
    a.restore(snap)
    assert len(reads) == 1  # nothing to undo
    _set_w(a.model, 3 * W)
    np.testing.assert_allclose(_out(a), _expect(3 * W), rtol=1e-6)
    a.restore(snap)
    assert len(reads) == 2  # read again to undo the edit
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)
    _set_w(a.model, 5 * W)  # and again: the snapshot stays usable
    a.restore(snap)
    np.testing.assert_allclose(_out(a), _expect(W), rtol=1e-6)
    assert isinstance(a.snapshot(), ir.Model)  # no longer the model read from the source
