"""cleanup sorts the graph only when it is out of order (an excision edits constants in
place and keeps the order; the sort is a whole-graph pass)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from graphsurg.passes.onnx.cleanup import Cleanup, _is_sorted
from onnx import TensorProto, helper, numpy_helper


def _model(swap: bool) -> ir.Model:
    w = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    n1 = helper.make_node("MatMul", ["x", "w"], ["h"], name="mm")
    n2 = helper.make_node("Relu", ["h"], ["y"], name="relu")
    g = helper.make_graph([n2, n1] if swap else [n1, n2], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    return ir.serde.deserialize_model(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_sorted_graph_is_recognised_and_left_in_order() -> None:
    m = _model(swap=False)
    assert _is_sorted(m.graph)
    order = list(m.graph)
    Cleanup(infer_shapes=False)(m)
    assert all(a is b for a, b in zip(order, m.graph, strict=True))


def test_out_of_order_graph_is_sorted() -> None:
    m = _model(swap=True)
    assert not _is_sorted(m.graph)
    Cleanup(infer_shapes=False)(m)
    assert [n.op_type for n in m.graph] == ["MatMul", "Relu"]
    assert _is_sorted(m.graph)


def test_graph_with_a_subgraph_is_never_taken_as_sorted() -> None:
    m = _model(swap=False)
    cond = ir.Value(name="c", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    m.graph.inputs.append(cond)
    branches = []
    for b in ("then", "else"):
        ident = ir.Node("", "Identity", [m.graph.inputs[0]], name=f"{b}_id")
        branches.append(ir.Graph([], ident.outputs, nodes=[ident], name=b))
    node = ir.Node("", "If", [cond], attributes=[ir.AttrGraph("then_branch", branches[0]),
                                                 ir.AttrGraph("else_branch", branches[1])])
    m.graph.append(node)
    assert not _is_sorted(m.graph)
