"""The plain lane: ``gso.apply`` of a diagnosis without data to a ``ModelProto`` whose every
excision site is plain edits the protobuf (``graphsurg.passes.onnx.plain``) and must give
the model the general path (onnx-ir, ``excise_site``) gives: the same initializers bit for
bit, the same nodes, value shapes and result -- and never read the model into onnx-ir.
Everything that is not plain goes the general way."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphsurg.passes.onnx.plain import ProtoIndex, lift_constants, plain_reason
from onnx import TensorProto, helper, numpy_helper

import graphsurg.onnx as G
from graphsurg import onnx as gso

RNG = np.random.default_rng(0)


def _layer(op: str, x: str, name: str, n_in: int, n_out: int, inits: list, *,
           dead: tuple[int, ...] = (), const: float = -4.0, bias: bool = True,
           trans_b: int = 1, pads: int = 0) -> tuple[list[onnx.NodeProto], str]:
    """One layer whose units ``dead`` compute the constant ``const`` (zero weights)."""
    if op == "Conv":
        w = RNG.standard_normal((n_out, n_in, 3, 3)).astype(np.float32) * 0.3
    elif op == "Gemm" and trans_b:
        w = RNG.standard_normal((n_out, n_in)).astype(np.float32) * 0.3
    else:
        w = RNG.standard_normal((n_in, n_out)).astype(np.float32) * 0.3
    b = (RNG.standard_normal(n_out) * 0.1 + 0.3).astype(np.float32)
    for u in dead:
        if op == "Conv" or (op == "Gemm" and trans_b):
            w[u] = 0.0
        else:
            w[:, u] = 0.0
        b[u] = const
    inits.append(numpy_helper.from_array(w, f"{name}_w"))
    nodes: list[onnx.NodeProto] = []
    ins = [x, f"{name}_w"]
    if bias and op != "MatMul":
        inits.append(numpy_helper.from_array(b, f"{name}_b"))
        ins.append(f"{name}_b")
    attrs: dict = {}
    if op == "Gemm":
        attrs["transB"] = trans_b
    if op == "Conv":
        attrs["pads"] = [pads] * 4
        attrs["kernel_shape"] = [3, 3]
    nodes.append(helper.make_node(op, ins, [f"{name}_y"], name=name, **attrs))
    out = f"{name}_y"
    if op == "MatMul" and bias:
        inits.append(numpy_helper.from_array(b, f"{name}_add_b"))
        nodes.append(helper.make_node("Add", [out, f"{name}_add_b"], [f"{name}_z"],
                                      name=f"{name}_add"))
        out = f"{name}_z"
    return nodes, out


def _mlp(op: str = "Gemm", act: str = "Relu", *, trans_b: int = 1, const: float = -4.0,
         width: int = 12, value_info: bool = False) -> onnx.ModelProto:
    inits: list = []
    nodes: list = []
    x = "x"
    dims = [6, width, width, 3]
    for i in range(3):
        dead = (1, 4, 7) if i < 2 else ()
        ns, x = _layer(op, x, f"fc{i}", dims[i], dims[i + 1], inits, dead=dead, const=const,
                       trans_b=trans_b)
        nodes += ns
        if i < 2:
            nodes.append(helper.make_node(act, [x], [f"a{i}"], name=f"act{i}"))
            x = f"a{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                       ["n", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return onnx.shape_inference.infer_shapes(m) if value_info else m


def _cnn(pads: int, act: str = "Relu", const: float = -4.0) -> onnx.ModelProto:
    inits: list = []
    nodes: list = []
    n1, x = _layer("Conv", "x", "c0", 3, 8, inits, dead=(2, 5), const=const, pads=pads)
    nodes += n1 + [helper.make_node(act, [x], ["a0"], name="act0")]
    n2, x = _layer("Conv", "a0", "c1", 8, 4, inits, pads=pads)
    nodes += n2
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                       ["n", 3, 10, 10])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT,
                                                         ["n", 4, 10 - 4 * (1 - pads),
                                                          10 - 4 * (1 - pads)])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _data(m: onnx.ModelProto, n: int = 64) -> dict[str, np.ndarray]:
    i = m.graph.input[0]
    shape = [n if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
    return {i.name: RNG.standard_normal(shape).astype(np.float32)}


_ACT = {"Relu": lambda c: max(c, 0.0), "LeakyRelu": lambda c: c if c >= 0 else 0.01 * c,
        "Sigmoid": lambda c: 1.0 / (1.0 + np.exp(-c)), "Tanh": np.tanh}


def _diagnosis(m: onnx.ModelProto, act: str, const: float) -> gso.Diagnosis:
    """The dead units _layer planted (every activation site with them), as analyze names
    them: ``constant`` units and their ``constant_values``."""
    from graphsurg import Problem, Site

    problems = []
    for n in m.graph.node:
        if n.op_type != act:
            continue
        layer = n.name.replace("act", "fc" if not m.graph.node[0].op_type == "Conv" else "c")
        w = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == f"{layer}_w")
        node = next(x for x in m.graph.node if x.name == layer)
        conv = w.ndim == 4
        by_row = conv or (node.op_type == "Gemm" and any(a.name == "transB" and a.i
                                                         for a in node.attribute))
        rows = w if by_row else w.T
        dead = [u for u in range(rows.shape[0]) if not rows[u].any()]
        value = float(_ACT[act](const))
        problems.append(Problem("DeadNeurons", Site(layer, n.output[0], act.lower(), "onnx"),
                                len(dead) / rows.shape[0], tuple(dead),
                                evidence={"width": rows.shape[0], "constant": dead,
                                          "constant_values": [value] * len(dead),
                                          "channel_dim": 1 if conv else -1}))
    return gso.Diagnosis(problems=problems, capture="onnxruntime", batches=1)


def _both(m: onnx.ModelProto, diag: gso.Diagnosis, monkeypatch: pytest.MonkeyPatch):
    """(plain result, general result) of the same diagnosis; the plain one never opens the
    model in onnx-ir."""
    with monkeypatch.context() as mp:
        def refuse(*a, **k):
            raise AssertionError("the plain lane read the model into onnx-ir")
        mp.setattr(G.OnnxAdapter, "open", refuse)
        plain = gso.apply(m, diag)
    with monkeypatch.context() as mp:
        mp.setattr(G, "_apply_plain", lambda *a, **k: None)
        slow = gso.apply(m, diag)
    return plain, slow


def _same_model(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert ia.keys() == ib.keys()
    for k in ia:
        assert ia[k].dtype == ib[k].dtype and ia[k].shape == ib[k].shape, k
        assert np.array_equal(ia[k], ib[k]), k
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    va = {v.name: v.type for v in (*a.graph.value_info, *a.graph.output)}
    vb = {v.name: v.type for v in (*b.graph.value_info, *b.graph.output)}
    for k in va.keys() & vb.keys():  # (the general path also describes the initializers)
        assert va[k] == vb[k], k
    # every value a node produces has its type and shape in the result (inferred)
    missing = [n.output[0] for n in a.graph.node if n.output[0] not in va]
    assert not missing, missing


def _outputs(m: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, feed)[0], np.float64)


CASES = [
    ("gemm transB=1, Relu", lambda: _mlp("Gemm", "Relu"), "Relu", -4.0),
    ("gemm transB=0, Relu", lambda: _mlp("Gemm", "Relu", trans_b=0), "Relu", -4.0),
    ("gemm, Sigmoid (non-zero constants fold)", lambda: _mlp("Gemm", "Sigmoid", const=-3.0),
     "Sigmoid", -3.0),
    ("gemm, LeakyRelu (negative constants fold)", lambda: _mlp("Gemm", "LeakyRelu"),
     "LeakyRelu", -4.0),
    ("matmul + Add, Tanh (fold into the Add)", lambda: _mlp("MatMul", "Tanh", const=0.7),
     "Tanh", 0.7),
    ("matmul + Add, Relu, value infos", lambda: _mlp("MatMul", "Relu", value_info=True),
     "Relu", -4.0),
    ("gemm, Relu, value infos", lambda: _mlp("Gemm", "Relu", value_info=True), "Relu", -4.0),
    ("conv padded, Relu (zero constants)", lambda: _cnn(pads=1), "Relu", -4.0),
    ("conv unpadded, Sigmoid (folds into the bias)",
     lambda: _cnn(pads=0, act="Sigmoid", const=-3.0), "Sigmoid", -3.0),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_plain_lane_gives_the_general_paths_model(case, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    m = case[1]()
    diag = _diagnosis(m, case[2], case[3])
    sites = 1 if m.graph.node[0].op_type == "Conv" else 2
    assert len(diag.problems) == sites
    before = m.SerializeToString()
    assert plain_reason(m, ProtoIndex(m), diag.problems) is None
    (a, ra), (b, rb) = _both(m, diag, monkeypatch)
    assert m.SerializeToString() == before  # the input proto is untouched
    _same_model(a, b)
    assert ra.size == rb.size and ra.size["params_after"] < ra.size["params_before"]
    assert len(ra.kept_at("excise_dead")) == len(rb.kept_at("excise_dead")) == sites
    assert [v.units for v in ra.applied.values()] == [v.units for v in rb.applied.values()]
    assert [v.details for v in ra.applied.values()] == [v.details for v in rb.applied.values()]
    assert ra.verified_on == rb.verified_on
    feed = _data(m, 32)
    ref = _outputs(m, feed)
    got = _outputs(a, feed)
    # float32 models: the excised model's outputs against the original's, in float64
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_a_diagnosis_from_analyze_takes_the_plain_lane(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The deployment flow: analyze with data, then apply the diagnosis alone."""
    m = _mlp("Gemm", "Relu")
    diag = gso.analyze(m, [_data(m) for _ in range(2)])
    assert len(diag.of_kind("DeadNeurons")) == 2, diag.summary()
    (a, ra), (b, rb) = _both(m, diag, monkeypatch)
    _same_model(a, b)
    assert ra.size == rb.size and len(ra.kept_at("excise_dead")) == 2


def _with(m: onnx.ModelProto, edit) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    out = onnx.ModelProto()
    out.CopyFrom(m)
    edit(out)
    return out


def _share_weight(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Identity", ["fc0_w"], ["extra"], name="extra"))
    m.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [12, 6]))


NOT_PLAIN = [
    ("the layer's weight is read elsewhere too", _share_weight, "weight of its own"),
    ("the site value is also a graph output",
     lambda m: m.graph.output.append(helper.make_tensor_value_info("a0", TensorProto.FLOAT,
                                                                   None)),
     "graph output"),
    ("an unused initializer",
     lambda m: m.graph.initializer.append(numpy_helper.from_array(np.zeros(2, np.float32),
                                                                  "spare")),
     "unused"),
    ("a Constant that is not lifted (strings)",
     lambda m: m.graph.node.insert(0, helper.make_node("Constant", [], ["k"],
                                                       value_strings=["a"])),
     "Constant"),
    ("out of order",
     lambda m: m.graph.node.insert(0, m.graph.node.pop(1)), "not sorted"),
    ("IR 3", lambda m: setattr(m, "ir_version", 3), "IR < 4"),
]


@pytest.mark.parametrize("case", NOT_PLAIN, ids=[c[0] for c in NOT_PLAIN])
def test_what_is_not_plain_is_named(case) -> None:  # type: ignore[no-untyped-def]
    from graphsurg import Problem, Site

    m = _with(_mlp("Gemm", "Relu"), case[1])
    lift_constants(m)  # as apply does first
    p = Problem("DeadNeurons", Site("fc0", "a0", "relu", "onnx"), 0.25, (1,),
                evidence={"width": 12, "constant": [1], "constant_values": [0.0],
                          "channel_dim": -1})
    why = plain_reason(m, ProtoIndex(m), [p])
    assert why is not None and case[2] in why, why


def test_weights_in_constant_nodes_are_lifted_and_take_the_plain_lane(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """tf2onnx / Paddle2ONNX keep weights in Constant nodes: the lane lifts them to
    initializers as the general path does, and both give the same model."""
    m = _mlp("Gemm", "Sigmoid", const=-3.0)
    diag = _diagnosis(m, "Sigmoid", -3.0)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    nodes = consts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.initializer[:]
    (a, ra), (b, rb) = _both(m, diag, monkeypatch)
    _same_model(a, b)
    assert not [n for n in a.graph.node if n.op_type == "Constant"]
    assert ra.size == rb.size and ra.size["nodes_before"] == len(nodes) - len(consts)
    assert len(ra.kept_at("excise_dead")) == 2


def test_the_plain_adapter_runs_and_saves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PlainAdapter's run and save (through an onnx-ir copy) are the model's."""
    from graphsurg.passes.onnx.plain_adapter import PlainAdapter

    m = _mlp("Gemm", "Relu")
    work = _with(m, lambda x: None)  # the adapter edits what it is given: a private copy
    a = PlainAdapter(work, ProtoIndex(work))
    feed = _data(m, 8)
    np.testing.assert_array_equal(a.run([feed])[0], _outputs(m, feed).astype(np.float32))
    snap = a.snapshot()
    a.model.graph.initializer[0].raw_data = b"\0" * len(a.model.graph.initializer[0].raw_data)
    a.restore(snap)
    assert a.current.SerializeToString() == m.SerializeToString()
    out = tmp_path / "m.onnx"
    assert a.save(out) == [out]
    np.testing.assert_array_equal(_outputs(onnx.load(str(out)), feed), _outputs(m, feed))


def test_a_residual_join_goes_the_general_way(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A residual Add after the site is excise_site's (not plain): apply tries the plain
    lane, which declines, and the general path treats the model."""
    m = _mlp("Gemm", "Relu")
    nodes = list(m.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.name == "fc1")
    nodes[at].input[0] = "res"
    nodes.insert(at, helper.make_node("Add", ["a0", "a0"], ["res"], name="res_add"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    diag = _diagnosis(m, "Relu", -4.0)
    idx = ProtoIndex(m)
    assert "res_add" in (plain_reason(m, idx, diag.problems) or "")
    called = []
    real = G._apply_plain
    monkeypatch.setattr(G, "_apply_plain", lambda *a, **k: called.append(1) or real(*a, **k))
    out, res = gso.apply(m, diag)
    assert called and len(res.kept_at("excise_dead")) >= 1


@pytest.mark.parametrize("full_check", [True, False])
def test_a_bad_input_is_named_as_the_input(full_check: bool) -> None:
    """The plain lane checks the input only when the result fails the checker: a bad input
    still gets load_model's one-line error naming it."""
    from graphsurg import Problem, Site

    m = _mlp("Gemm", "Relu")
    m.graph.node[1].attribute.append(helper.make_attribute("bogus", 1))  # Relu has no 'bogus'
    p = Problem("DeadNeurons", Site("fc0", "a0", "relu", "onnx"), 0.25, (1, 4, 7),
                evidence={"width": 12, "constant": [1, 4, 7], "constant_values": [0.0] * 3,
                          "channel_dim": -1})
    with pytest.raises(gso.OnnxInputError, match="the ModelProto is not a valid ONNX model"):
        gso.apply(m, gso.Diagnosis(problems=[p], capture="onnxruntime"), full_check=full_check)


def test_a_model_file_and_the_cli_take_the_plain_lane(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``graphsurg onnx apply m.onnx --diagnosis d.json -o out.onnx``: the file is written
    atomically and is the general path's model; the input file is untouched."""
    from graphsurg import _cli

    m = _mlp("MatMul", "Relu", value_info=True)
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src))
    before = src.read_bytes()
    diag = _diagnosis(m, "Relu", -4.0)
    d = tmp_path / "d.json"
    d.write_text(diag.to_json())
    out = tmp_path / "out.onnx"
    with monkeypatch.context() as mp:
        def refuse(*a, **k):
            raise AssertionError("the plain lane read the model into onnx-ir")
        mp.setattr(G.OnnxAdapter, "open", refuse)
        assert _cli.main(["onnx", "apply", str(src), "--diagnosis", str(d), "-o", str(out)]) == 0
    with monkeypatch.context() as mp:
        mp.setattr(G, "_apply_plain", lambda *a, **k: None)
        ref, _ = gso.apply(m, diag)
    _same_model(onnx.load(str(out)), ref)
    assert src.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".graphsurg-")]
    with pytest.raises(gso.OnnxInputError, match="is the input file"):
        gso.apply(str(src), diag, output=str(src))


def _random_model(seed: int) -> tuple[onnx.ModelProto, gso.Diagnosis]:
    """A random MLP of 2-4 layers (Gemm transB 0/1, MatMul with or without a bias Add),
    random activations, a random set of units per layer made constant (zero weights, a
    random pre-activation), value infos or not; and the diagnosis naming those units."""
    from graphsurg import Problem, Site

    rng = np.random.default_rng(seed)
    acts = ["Relu", "LeakyRelu", "Sigmoid", "Tanh"]
    n_layers = int(rng.integers(2, 5))
    dims = [int(rng.integers(3, 9))] + [int(rng.integers(4, 12)) for _ in range(n_layers)]
    inits: list = []
    nodes: list = []
    problems = []
    x = "x"
    for i in range(n_layers):
        op = str(rng.choice(["Gemm", "Gemm", "MatMul"]))
        tb = int(rng.integers(0, 2))
        n_in, n_out = dims[i], dims[i + 1]
        last = i == n_layers - 1
        dead = () if last else tuple(sorted(rng.choice(n_out, int(rng.integers(1, n_out - 1)),
                                                       replace=False).tolist()))
        const = float(rng.uniform(-3, 3))
        bias = op == "Gemm" or bool(rng.integers(0, 2))
        w = (rng.standard_normal((n_out, n_in) if op == "Gemm" and tb else (n_in, n_out))
             * 0.4).astype(np.float32)
        b = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
        for u in dead:
            if op == "Gemm" and tb:
                w[u] = 0
            else:
                w[:, u] = 0
            b[u] = const if bias else 0.0
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        if op == "Gemm":
            inits.append(numpy_helper.from_array(b, f"b{i}"))
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"],
                                          name=f"fc{i}", transB=tb))
            h = f"h{i}"
        else:
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
            h = f"h{i}"
            if bias:
                inits.append(numpy_helper.from_array(b, f"b{i}"))
                nodes.append(helper.make_node("Add", [h, f"b{i}"], [f"z{i}"], name=f"add{i}"))
                h = f"z{i}"
        if last:
            nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
            break
        act = str(rng.choice(acts))
        nodes.append(helper.make_node(act, [h], [f"a{i}"], name=f"act{i}"))
        pre = const if bias else 0.0
        value = float(_ACT[act](pre))
        problems.append(Problem("DeadNeurons", Site(f"fc{i}", f"a{i}", act.lower(), "onnx"),
                                len(dead) / n_out, dead,
                                evidence={"width": n_out, "constant": list(dead),
                                          "constant_values": [value] * len(dead),
                                          "channel_dim": -1}))
        x = f"a{i}"
    g = helper.make_graph(nodes, "random",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dims[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                         ["n", dims[-1]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    if rng.integers(0, 2):
        m = onnx.shape_inference.infer_shapes(m)
    return m, gso.Diagnosis(problems=problems, capture="onnxruntime", batches=1)


def test_random_plain_models_match_the_general_path(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """40 random models: wherever the plain lane is taken its model is the general path's,
    and every result computes what the input did (float64 comparison, float32 models)."""
    from graphsurg.passes.onnx import plain_adapter

    taken = 0
    for seed in range(40):
        m, diag = _random_model(seed)
        made: list[int] = []
        real_init = plain_adapter.PlainAdapter.__init__

        def spy(self, *a, _real=real_init, _made=made, **k):  # type: ignore[no-untyped-def]
            _made.append(1)
            _real(self, *a, **k)

        with monkeypatch.context() as mp:
            mp.setattr(plain_adapter.PlainAdapter, "__init__", spy)
            a, ra = gso.apply(m, diag)
        with monkeypatch.context() as mp:
            mp.setattr(G, "_apply_plain", lambda *a, **k: None)
            b, rb = gso.apply(m, diag)
        if made:
            taken += 1
            _same_model(a, b)
            assert ra.size == rb.size, seed
            assert [v.units for v in ra.applied.values()] == \
                [v.units for v in rb.applied.values()], seed
        assert len(ra.kept_at("excise_dead")) == len(rb.kept_at("excise_dead")), seed
        feed = {"x": np.random.default_rng(seed).standard_normal(
            (16, m.graph.input[0].type.tensor_type.shape.dim[1].dim_value)).astype(np.float32)}
        ref = _outputs(m, feed)
        np.testing.assert_allclose(_outputs(a, feed), ref, rtol=1e-5,
                                   atol=1e-5 * float(np.abs(ref).max()), err_msg=str(seed))
    # (28 of 40: the others fold a non-zero constant into a MatMul with no bias Add after it,
    # where the general path inserts an Add node -- not plain)
    assert taken >= 25, taken
