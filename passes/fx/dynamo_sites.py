"""Site discovery on Dynamo graphs (the graphs a ``torch.compile`` backend receives).

Dynamo inlines nn modules: ``nn.ReLU`` arrives as ``torch.nn.functional.relu``, a Linear as
``torch._C._nn.linear`` whose weight is a *placeholder* (not a ``get_attr``), and the module
origin lives in ``node.meta["nn_module_stack"]`` and in each placeholder's
``node.meta["grapharg"].source`` (``L['self']._modules['fc1']._parameters['weight']``).

``find_dynamo_sites`` is :func:`graphsurg.passes.fx.capture.find_sites` for such graphs: the
same op tables and the same producer/follower rules (it reuses capture's helpers), with the
layer's module resolved through the weight placeholder's source. Module paths are those of
``model.named_modules()`` (``"0"``, ``"encoder.fc1"``), so they match ``gs.diagnose``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.fx as fx

from .capture import ActSite, LayerSite, find_sites

_TOKEN = re.compile(r"\.([A-Za-z_][\w]*|\d+)|\[\s*['\"]([^'\"]+)['\"]\s*\]|\[\s*(\d+)\s*\]")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def source_path(source: str) -> str:
    """``"L['fn']._modules['0']._parameters['weight']"`` -> ``"0.weight"``.

    The root (``L['self']``, ``L['fn']``, ``G['model']``) is dropped; ``_modules`` /
    ``_parameters`` / ``_buffers`` containers are skipped; attribute and item accesses
    are joined with dots. Works for ``nn_module_stack`` paths too (``"L['self'].layers[0]"``).
    """
    m = re.match(r"^\s*[A-Za-z_]\w*\[\s*['\"][^'\"]*['\"]\s*\]", source)
    rest = source[m.end():] if m else "." + source  # a bare module path: "encoder.fc1"
    parts: list[str] = []
    for tok in _TOKEN.finditer(rest):
        part = tok.group(1) or tok.group(2) or tok.group(3)
        if part and part not in _CONTAINERS:
            parts.append(part)
    return ".".join(parts)


def placeholder_source(node: fx.Node) -> str | None:
    """The Dynamo source name of a placeholder (``None`` when it has none)."""
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    if src is None:
        return None
    name = src.name
    return str(name() if callable(name) else name)


def parameter_placeholders(gm: fx.GraphModule) -> dict[int, str]:
    """Placeholder index -> parameter path (``"fc1.weight"``) for the graph's parameters."""
    out: dict[int, str] = {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        src = placeholder_source(node)
        if src is not None and "_parameters[" in src.replace('"', "'"):
            out[i] = source_path(src)
    return out


def owner_path(node: fx.Node) -> str:
    """Module path owning a node, from ``nn_module_stack`` (``""`` when unknown)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return source_path(str(list(stack.values())[-1][0]))


def _weight_module(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        return str(node.target)
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(w, fx.Node):
        return None
    if w.op == "get_attr":
        target = str(w.target)
    elif w.op == "placeholder":
        src = placeholder_source(w)
        if src is None:
            return None
        target = source_path(src)
    else:
        return None
    return target.rsplit(".", 1)[0] if "." in target else target


@dataclass
class DynamoSites:
    """What the monitor observes in one Dynamo graph."""

    layers: list[LayerSite]
    acts: list[ActSite]
    params: dict[int, str] = field(default_factory=dict)  # placeholder index -> param path
    weights: dict[str, int] = field(default_factory=dict)  # layer module -> weight placeholder


def find_dynamo_sites(gm: fx.GraphModule) -> DynamoSites:
    """Layers, observed sites and parameter placeholders of a Dynamo graph, in forward order."""
    layers, acts = find_sites(gm, weight_module=_weight_module, owner=owner_path)
    by_name = {n.name: n for n in gm.graph.nodes}
    index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    weights: dict[str, int] = {}
    for ls in layers:
        node = by_name[ls.node]
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(w, fx.Node) and w in index:
            weights[ls.module] = index[w]
    return DynamoSites(layers, acts, parameter_placeholders(gm), weights)


__all__ = ["DynamoSites", "find_dynamo_sites", "owner_path", "parameter_placeholders",
           "placeholder_source", "source_path"]
