"""``relu_to_leaky_relu``: give dying ReLU layers a gradient again.

Rewrites (a named onnxscript rule, ``relu_to_leaky_relu``)::

    Relu(X) -> LeakyRelu(X, alpha=0.01)      at the Relu outputs diagnosed as dying

A Relu is dying when the diagnosis found dormant units at its output that ``excise_dead_units``
did not remove. Not function preserving: the output changes by about ``alpha`` times the
negative pre-activations, which ``apply`` measures against ``max_output_change``. LeakyRelu
exists from opset 6; below that the rule refuses.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRule, RewriteRuleClassBase

from graphsurg._problems import Diagnosis

from ._base import GraphsurgPass, PassState

RULE_NAME = "relu_to_leaky_relu"


class ReluToLeakyRelu(RewriteRuleClassBase):
    """``Relu(X) -> LeakyRelu(X, alpha)`` where the Relu's output name is in ``sites`` (all
    Relus when ``sites`` is None). ``check`` fails with the reason, which is also kept in
    ``refusals`` as ``(value name, reason)``."""

    def __init__(self, sites: Collection[str] | None = None, alpha: float = 0.01) -> None:
        super().__init__(name=RULE_NAME)
        self.sites = None if sites is None else frozenset(sites)
        self.alpha = float(alpha)
        self.refusals: list[tuple[str, str]] = []

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Relu(x)

    def check(self, context: Any, x: ir.Value, **_: Any) -> MatchResult:  # type: ignore[override]
        result = MatchResult()
        out = context.root.outputs[0].name
        if self.sites is not None and out not in self.sites:
            return result.fail(f"Relu output '{out}' is not diagnosed as dying")
        opset = context.model.opset_imports.get("", context.model.opset_imports.get("ai.onnx", 0))
        if opset < 6:
            reason = f"the model's opset {opset} has no LeakyRelu (needs opset >= 6)"
            self.refusals.append((out, reason))
            return result.fail(reason)
        return result

    def rewrite(self, op: Any, x: ir.Value, **_: Any) -> Any:
        return op.LeakyRelu(x, alpha=self.alpha)


def leaky_rule(sites: Collection[str] | None = None, alpha: float = 0.01) -> RewriteRule:
    """The named ``relu_to_leaky_relu`` rule restricted to ``sites`` (Relu output names)."""
    return ReluToLeakyRelu.rule(sites, alpha)


def dying_relu_sites(diagnosis: Diagnosis, state: PassState | None = None) -> list[str]:
    """Relu output names with dormant units that were not excised."""
    excised = state.excised if state is not None else {}
    out = []
    for p in diagnosis.of_kind("DeadNeurons"):
        if p.site.op != "Relu":
            continue
        left = set(p.units) - excised.get(p.site.address, set())
        if left:
            out.append(p.site.node)
    return out


class ReluToLeakyReluPass(GraphsurgPass):
    """Apply the ``relu_to_leaky_relu`` rule at the diagnosed dying Relus only.

    The rule is tried on those nodes alone (not matched against every node of the graph), so
    the pass costs O(sites) after an O(nodes) lookup."""

    name = RULE_NAME
    exact = False

    def __init__(
        self,
        diagnosis: Diagnosis | None = None,
        state: PassState | None = None,
        *,
        alpha: float = 0.01,
    ) -> None:
        super().__init__(diagnosis, state)
        self.alpha = alpha

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.diagnosis is None:
            raise ValueError("relu_to_leaky_relu needs a diagnosis (run graphsurg.onnx.analyze)")
        sites = dying_relu_sites(self.diagnosis, self.state)
        if not sites:
            return ir.passes.PassResult(model, False)
        wanted = set(sites)
        rule_obj = ReluToLeakyRelu(wanted, self.alpha)
        rule = RewriteRule(
            rule_obj.pattern, rule_obj.rewrite, rule_obj.check, name=RULE_NAME
        )
        graph = model.graph
        targets = [n for n in graph if n.op_type == "Relu" and n.outputs[0].name in wanted]
        found = {n.outputs[0].name for n in targets}
        for s in sorted(wanted - found):
            self.refuse(s, f"Relu output '{s}' is not in the model")
        for node in targets:
            delta = rule.try_rewrite(model, graph, node)
            if delta is None:
                continue
            for n in delta.new_nodes:
                n.metadata_props["pkg.onnxscript.rewriter.rule_name"] = RULE_NAME
                n.name = node.name
            ir.convenience.replace_nodes_and_values(
                graph, node, delta.match.nodes, delta.new_nodes, delta.match.outputs,
                delta.new_outputs,
            )  # fmt: skip  (keeps the value names: sites and graph outputs stay addressable)
            self.rewrites += 1
        for out, reason in rule_obj.refusals:
            self.refuse(out, reason)
        return ir.passes.PassResult(model, self.rewrites > 0)


def rules(diagnosis: Diagnosis, *, alpha: float = 0.01) -> list[RewriteRule]:
    """The ``relu_to_leaky_relu`` rule restricted to the dying Relus of ``diagnosis`` (a rule
    that matches nothing when there are none)."""
    return [leaky_rule(dying_relu_sites(diagnosis), alpha)]
