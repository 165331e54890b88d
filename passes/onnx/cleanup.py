"""``cleanup``: what every rewrite leaves to tidy.

Removes unused nodes and initializers, sorts the graph topologically and re-infers shapes
(onnx shape inference, keeping the shapes it cannot infer). Runs last in every ``apply``.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass, TopologicalSortPass

from ._pass import GraphsurgPass


class Cleanup(GraphsurgPass):
    """Unused nodes/initializers removed, topological order, shape inference."""

    name = "cleanup"
    exact = True
    needs_diagnosis = False

    def __init__(self, *args: object, infer_shapes: bool = True, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.infer_shapes = infer_shapes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before_nodes = model.graph.num_nodes()
        before_inits = len(model.graph.initializers)
        modified = RemoveUnusedNodesPass()(model).modified
        # an excision edits constants in place and keeps the order: no whole-graph sort then
        # (functions are sorted by the pass too: a model with any is always sorted)
        if model.functions or not _is_sorted(model.graph):
            modified |= TopologicalSortPass()(model).modified
        if self.infer_shapes:
            try:
                ShapeInferencePass(strict_mode=False)(model)
            except Exception as e:  # shape inference is best effort: keep the model as it is
                self.notes.append(f"shape inference skipped: {type(e).__name__}")
        removed = before_nodes - model.graph.num_nodes()
        removed_inits = before_inits - len(model.graph.initializers)
        self.rewrites = removed + removed_inits
        if self.rewrites:
            self.notes.append(f"removed {removed} node(s) and {removed_inits} initializer(s)")
        return ir.passes.PassResult(model, modified)


def _is_sorted(graph: ir.Graph) -> bool:
    """Whether every node of ``graph`` reads only graph inputs, initializers and values of
    the nodes before it (one pass; a graph with subgraphs is sorted anyway: their outer-scope
    reads are not followed here)."""
    seen = {id(v) for v in graph.inputs}
    seen.update(id(v) for v in graph.initializers.values())
    graph_attrs = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    for node in graph:
        if any(a.type in graph_attrs for a in node.attributes.values()):
            return False
        if any(v is not None and id(v) not in seen for v in node.inputs):
            return False
        seen.update(id(v) for v in node.outputs)
    return True
