"""Rewrite a SurgeryPlan's graph-level schemas into graphs graphsurg does not own.

Three entry points, one rewrite:

* ``rewrite_dynamo_graph(gm, plan)`` -- the ``plan`` option of the ``graphsurg``
  torch.compile backend (torch-level Dynamo graph, parameters as placeholders);
* ``apply_plan(exported_program, plan)`` -- for torch.export users: ExportedProgram in,
  a new ExportedProgram out (the input is unchanged), still exportable with
  ``torch.onnx.export``;
* ``PlanGraphPass(plan)`` -- an Inductor ``CustomGraphPass`` (``post_grad_custom_pre_pass`` /
  ``post_grad_custom_post_pass``) with a ``uuid()`` derived from the plan and this file, so
  Inductor's compile cache stays correct.

Rewrites (a schema's ``graph_rewrite``, which the planner asked of the library)::

    {"activation": "leaky_relu", "negative_slope": a}:  relu(x) / relu6(x) -> leaky_relu(x, a)

Schemas without a graph rewrite need new or reshaped parameters and cannot be expressed in a
graph whose parameters are inputs: :class:`PlanNotGraphLevel` names them and says to apply
them to the module with ``gs.operate`` (or ``gs.SurgeryCallback``) and compile the result.
The plan is read as plain data (a dict, its JSON, a path, or any object with ``to_dict()``):
this module does not import the planner.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch.nn import functional as F

from graphsurg._errors import BadInputError

from .capture import classify_nodes, producer_of
from .dynamo_sites import owner_path, placeholder_source, source_path

if TYPE_CHECKING:
    from torch.export import ExportedProgram

aten = torch.ops.aten

#: the graph rewrites this module can make (``Schema.graph_rewrite["activation"]``)
GRAPH_REWRITES = ("leaky_relu",)
_TORCH_RELU: dict[Any, str] = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_ATEN_RELU: dict[Any, str] = {aten.relu.default: "relu", aten.relu_.default: "relu",
                              aten.relu6.default: "relu6"}
_INPLACE_ATEN = {aten.relu_.default}


class PlanNotGraphLevel(BadInputError):
    """A plan holds schemas that cannot be rewritten into a graph whose parameters are inputs."""


@dataclass(frozen=True)
class Swap:
    """One graph-level activation swap: the ReLU after ``module`` becomes a leaky ReLU."""

    index: int
    module: str
    negative_slope: float


def load_plan(plan: Any) -> dict[str, Any]:
    """A plan as its dict, from a SurgeryPlan (anything with ``to_dict()``), a dict, its JSON
    text, or the path of its JSON file."""
    if hasattr(plan, "to_dict"):
        return dict(plan.to_dict())
    if isinstance(plan, dict):
        d = plan
    elif isinstance(plan, (str, os.PathLike)):
        text = str(plan)
        if not text.lstrip().startswith("{"):
            try:
                with open(text, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise BadInputError(f"plan {str(plan)!r}: cannot read it ({e.strerror}); pass "
                                    "a SurgeryPlan, its JSON, or the path of its JSON") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInputError(f"plan: not JSON ({e.msg} at line {e.lineno}); pass the "
                                "output of SurgeryPlan.to_json()") from None
    else:
        raise BadInputError(f"plan must be a SurgeryPlan, its JSON or a path, got "
                            f"{type(plan).__name__}")
    if not isinstance(d, dict) or not isinstance(d.get("schemas"), list):
        raise BadInputError("plan: no 'schemas' list; pass the output of "
                            "SurgeryPlan.to_json()")
    return d


def graph_swaps(plan: Any) -> list[Swap]:
    """The plan's schemas as graph rewrites; raises when any schema is not graph-level."""
    swaps: list[Swap] = []
    refused: list[str] = []
    for s in load_plan(plan)["schemas"]:
        rw = s.get("graph_rewrite") or {}
        module = str((s.get("site") or {}).get("module", ""))
        if rw.get("activation") in GRAPH_REWRITES:
            swaps.append(Swap(int(s["index"]), module, float(rw["negative_slope"])))
            continue
        variant = (s.get("params") or {}).get("variant")
        what = str(s.get("replacement")) + (f"(variant={variant!r})" if variant else "")
        refused.append(f"schema {s.get('index')} {what} at {module!r}")
    if refused:
        raise PlanNotGraphLevel(
            f"{'; '.join(refused)}: creates, reshapes or re-initialises parameters, which a "
            "compiled/exported graph receives as inputs and cannot change; apply the plan to "
            "the module with gs.operate(...) (or gs.SurgeryCallback in a training loop) and "
            "compile the result. Graph-level here: a leaky activation swap.")
    return swaps


def _layer_module(node: fx.Node, param_names: dict[str, str]) -> str:
    """Module path of a layer node: from its weight input, else from nn_module_stack."""
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if isinstance(w, fx.Node):
        path = None
        if w.op == "get_attr":
            path = str(w.target)
        elif w.op == "placeholder":
            path = param_names.get(w.name)
            if path is None:
                src = placeholder_source(w)
                path = source_path(src) if src else None
        if path:
            return path.rsplit(".", 1)[0] if "." in path else ""
    return owner_path(node)


def _act_producer(gm: fx.GraphModule | None, node: fx.Node, param_names: dict[str, str],
                  kinds: dict[fx.Node, Any] | None) -> str:
    """Producer module of an activation node (the layer whose units it activates)."""
    prod = producer_of(gm, node, kinds) if gm is not None else None
    if prod is not None:
        return _layer_module(prod, param_names)
    arg = node.args[0] if node.args else None
    # post-grad graphs: linear is addmm/mm; the input node's own module is the producer
    return owner_path(arg) if isinstance(arg, fx.Node) else ""


def rewrite_graph(graph: fx.Graph, swaps: list[Swap], *, gm: fx.GraphModule | None = None,
                  param_names: dict[str, str] | None = None) -> list[int]:
    """Apply ``swaps`` to ``graph`` in place; returns the schema indices applied.

    Raises:
        BadInputError: a swap's site has no ReLU in this graph... only when no swap matched
            at all is it an error for the caller; here unmatched swaps are simply not listed.
    """
    names = param_names or {}
    by_module = {s.module: s for s in swaps}
    kinds = classify_nodes(gm) if gm is not None else None
    applied: list[int] = []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        is_aten = node.target in _ATEN_RELU
        if not (is_aten or node.target in _TORCH_RELU):
            continue
        sw = by_module.get(_act_producer(gm, node, names, kinds))
        if sw is None:
            continue
        x = node.args[0]
        if is_aten:
            node.target = (aten.leaky_relu_.default if node.target in _INPLACE_ATEN
                           else aten.leaky_relu.default)
            node.args = (x, sw.negative_slope)
            node.kwargs = {}
        else:
            inplace = bool(node.kwargs.get("inplace", False))
            node.target = F.leaky_relu
            node.args = (x, sw.negative_slope)
            node.kwargs = {"inplace": inplace} if inplace else {}
        node.meta["graphsurg_schema"] = sw.index
        applied.append(sw.index)
    return applied


def _check_all(swaps: list[Swap], applied: list[int], where: str) -> None:
    missing = [s for s in swaps if s.index not in applied]
    if missing:
        sites = ", ".join(f"schema {s.index} at {s.module!r}" for s in missing)
        raise BadInputError(f"{sites}: no ReLU after that module in the {where}; was the plan "
                            "made for this model?")


def rewrite_dynamo_graph(gm: fx.GraphModule, plan: Any) -> fx.GraphModule:
    """The backend's ``plan`` option: swap activations in a Dynamo graph (in place).

    With graph breaks a site lives in one of several graphs: a swap that matches nothing in
    this graph is not an error here.
    """
    swaps = graph_swaps(plan)
    if rewrite_graph(gm.graph, swaps, gm=gm):
        gm.graph.lint()
        gm.recompile()
    return gm


def apply_plan(exported_program: ExportedProgram, plan: Any) -> ExportedProgram:
    """Apply a plan's graph-level schemas to an ExportedProgram.

    Args:
        exported_program: from ``torch.export.export``. Not modified.
        plan: a SurgeryPlan, its JSON, or the path of its JSON (``gs.plan`` / ``gs.operate``).

    Returns:
        A new ExportedProgram with the same signature, parameters and buffers, and the
        rewritten graph; ``.module()`` runs it and ``torch.onnx.export`` exports it.

    Raises:
        PlanNotGraphLevel: a schema needs new or reshaped parameters (apply with gs.operate).
        BadInputError: a schema's site has no ReLU in the program.

    Example:
        >>> ep = torch.export.export(model, (x,))
        >>> ep2 = gs.passes.fx.apply_plan.apply_plan(ep, result.plan)
        >>> ep2.module()(x)
    """
    swaps = graph_swaps(plan)
    ep = copy.deepcopy(exported_program)
    names = dict(ep.graph_signature.inputs_to_parameters)
    applied = rewrite_graph(ep.graph_module.graph, swaps, gm=ep.graph_module, param_names=names)
    _check_all(swaps, applied, "exported program")
    ep.graph_module.graph.lint()
    ep.graph_module.recompile()
    return ep


@functools.cache
def _source_digest() -> str:
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _custom_graph_pass_base() -> type:
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass

        return CustomGraphPass  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - older torch
        return object


class PlanGraphPass(_custom_graph_pass_base()):  # type: ignore[misc]
    """An Inductor post-grad custom pass applying a plan's graph-level schemas.

    Example:
        >>> torch._inductor.config.post_grad_custom_pre_pass = PlanGraphPass(plan)
    """

    def __init__(self, plan: Any) -> None:
        self.swaps = graph_swaps(plan)
        self.applied: list[int] = []

    def __call__(self, graph: fx.Graph) -> None:
        self.applied += rewrite_graph(graph, self.swaps, gm=graph.owning_module)

    def uuid(self) -> bytes:
        spec = json.dumps([s.__dict__ for s in self.swaps], sort_keys=True)
        return hashlib.sha256(f"{spec}|{_source_digest()}".encode()).digest()


Callback = Callable[[fx.Graph], None]

__all__ = ["GRAPH_REWRITES", "PlanGraphPass", "PlanNotGraphLevel", "Swap", "apply_plan",
           "graph_swaps", "load_plan", "rewrite_dynamo_graph", "rewrite_graph"]
