"""``relu_to_leaky_relu``: give dying ReLU layers a gradient again.

Rewrites (a named onnxscript rule, ``relu_to_leaky_relu``)::

    Relu(X) -> LeakyRelu(X, alpha=0.01)      at the Relu outputs diagnosed as dying

A Relu is dying when the diagnosis found dormant units at its output that ``excise_dead_units``
did not remove. The ONNX applier of the library's ``activation_swap`` is :func:`swap_site`
(one site at a time); :class:`ReluToLeakyReluPass` loops over a diagnosis and calls it. Not function preserving: the output changes by about ``alpha`` times the
negative pre-activations, which ``apply`` measures against ``max_output_change``. LeakyRelu
exists from opset 6; below that the rule refuses.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRule, RewriteRuleClassBase

from graphsurg._errors import Refused
from graphsurg._problems import Diagnosis

from ._pass import GraphsurgPass, PassState

RULE_NAME = "relu_to_leaky_relu"
#: the default negative slope (torch.nn.LeakyReLU's default)
DEFAULT_ALPHA = 0.01


class ReluToLeakyRelu(RewriteRuleClassBase):
    """``Relu(X) -> LeakyRelu(X, alpha)`` where the Relu's output name is in ``sites`` (all
    Relus when ``sites`` is None). ``check`` fails with the reason, which is also kept in
    ``refusals`` as ``(value name, reason)``."""

    def __init__(self, sites: Collection[str] | None = None, alpha: float = DEFAULT_ALPHA) -> None:
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


def leaky_rule(sites: Collection[str] | None = None, alpha: float = DEFAULT_ALPHA) -> RewriteRule:
    """The named ``relu_to_leaky_relu`` rule restricted to ``sites`` (Relu output names)."""
    return ReluToLeakyRelu.rule(sites, alpha)


def dying_relu_sites(diagnosis: Diagnosis, state: PassState | None = None) -> list[str]:
    """Relu output names with dormant units that were not excised."""
    excised = state.excised if state is not None else {}
    out = []
    for p in diagnosis.of_kind("DeadNeurons"):
        if p.site.op != "relu":
            continue
        left = set(p.units) - excised.get(p.site.address, set())
        if left:
            out.append(p.site.node)
    return out


def swap_site(model: ir.Model, value: str, alpha: float = DEFAULT_ALPHA) -> str:
    """Rewrite the one Relu whose output is ``value`` into ``LeakyRelu(alpha)`` with the
    ``relu_to_leaky_relu`` rule restricted to that site; returns the node's name.

    The rule is tried on that node alone (not matched against every node of the graph). The
    value keeps its name, so the site and any graph output stay addressable.

    Raises:
        Refused: with the reason (no Relu produces ``value``, opset below 6).
    """
    graph = model.graph
    node = next((n for n in graph if n.op_type == "Relu" and n.domain in ("", "ai.onnx")
                 and n.outputs[0].name == value), None)
    if node is None:
        raise Refused(f"no Relu in the model produces '{value}'")
    rule_obj = ReluToLeakyRelu({value}, alpha)
    rule = RewriteRule(rule_obj.pattern, rule_obj.rewrite, rule_obj.check, name=RULE_NAME)
    delta = rule.try_rewrite(model, graph, node)
    if delta is None:
        why = rule_obj.refusals[0][1] if rule_obj.refusals else "the rule did not match"
        raise Refused(f"Relu '{node.name}' -> '{value}': {why}")
    for n in delta.new_nodes:
        n.metadata_props["pkg.onnxscript.rewriter.rule_name"] = RULE_NAME
        n.name = node.name
    ir.convenience.replace_nodes_and_values(
        graph, node, delta.match.nodes, delta.new_nodes, delta.match.outputs,
        delta.new_outputs,
    )  # fmt: skip  (keeps the value names: sites and graph outputs stay addressable)
    return str(node.name)


class ReluToLeakyReluPass(GraphsurgPass):
    """Apply the ``relu_to_leaky_relu`` rule at the diagnosed dying Relus only, one site at a
    time with :func:`swap_site` (O(sites) after an O(nodes) lookup)."""

    name = RULE_NAME
    exact = False

    def __init__(
        self,
        diagnosis: Diagnosis | None = None,
        state: PassState | None = None,
        *,
        alpha: float = DEFAULT_ALPHA,
    ) -> None:
        super().__init__(diagnosis, state)
        self.alpha = alpha

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.diagnosis is None:
            raise ValueError("relu_to_leaky_relu needs a diagnosis (run graphsurg.onnx.analyze)")
        for value in dying_relu_sites(self.diagnosis, self.state):
            try:
                swap_site(model, value, self.alpha)
            except Refused as e:
                self.refuse(value, str(e))
                continue
            self.rewrites += 1
        return ir.passes.PassResult(model, self.rewrites > 0)


def rules(diagnosis: Diagnosis, *, alpha: float = DEFAULT_ALPHA) -> list[RewriteRule]:
    """The ``relu_to_leaky_relu`` rule restricted to the dying Relus of ``diagnosis`` (a rule
    that matches nothing when there are none)."""
    return [leaky_rule(dying_relu_sites(diagnosis), alpha)]
