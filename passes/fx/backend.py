"""The ``graphsurg`` torch.compile backend.

``torch.compile(model, backend="graphsurg", options={...})`` works without importing
graphsurg first: the backend is declared in the ``torch_dynamo_backends`` entry-point group
(pyproject.toml), and importing this module also registers it with
``torch._dynamo.register_backend(name="graphsurg")``.

Options (all optional):

* ``"monitor"``: a :class:`graphsurg.Monitor` (or any
  :class:`~graphsurg.passes.fx.observe_compiled.MonitorSink`); observes activations and
  gradient norms on every ``monitor.every``-th call (see
  :mod:`graphsurg.passes.fx.observe_compiled`).
* ``"plan"``: a SurgeryPlan, its JSON, or the path of its JSON; graph-level schemas are
  rewritten into the Dynamo graph before lowering (see :mod:`graphsurg.passes.fx.apply_plan`).
* ``"inner"``: where to lower afterwards: ``"inductor"`` (default), ``"eager"``,
  ``"aot_eager"``, any registered backend name, or a backend callable
  ``fn(gm, example_inputs) -> callable``.

With no options the backend is the inner backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from graphsurg._errors import BadInputError

CompilerFn = Callable[[fx.GraphModule, Sequence[Any]], Callable[..., Any]]
OPTION_KEYS = ("plan", "monitor", "inner")


def resolve_inner(inner: str | CompilerFn | None, mode: str | None = None) -> CompilerFn:
    """The inner backend as a compiler function ``fn(gm, example_inputs)``.

    ``mode`` (``torch.compile(mode=...)``) is honoured by inductor and ignored by the others.
    """
    if inner is None or inner == "inductor":
        def inductor(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
            from torch._inductor.compile_fx import compile_fx

            patches = None
            if mode and mode != "default":
                patches = torch._inductor.list_mode_options(mode)
            return compile_fx(gm, list(example_inputs), config_patches=patches)  # type: ignore[return-value]

        return inductor
    if isinstance(inner, str):
        if inner == "graphsurg":
            raise BadInputError("options['inner']='graphsurg' would recurse; pass the backend "
                                "to lower to: 'inductor', 'eager', 'aot_eager' or a callable")
        from torch._dynamo.backends.registry import lookup_backend

        try:
            return lookup_backend(inner)  # type: ignore[return-value]
        except Exception as e:
            raise BadInputError(
                f"options['inner']={inner!r} is not a torch.compile backend "
                f"({type(e).__name__}); use 'inductor', 'eager', 'aot_eager', a name from "
                f"torch._dynamo.list_backends(), or a callable fn(gm, example_inputs)") from e
    if callable(inner):
        return inner
    raise BadInputError(f"options['inner'] must be a backend name or a callable, got "
                        f"{type(inner).__name__}")


def graphsurg_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                      options: dict[str, Any] | None = None,
                      mode: str | None = None) -> Callable[..., Any]:
    """A torch.compile backend: rewrite the plan into the graph, observe it, then lower it.

    Args:
        gm: the Dynamo graph (nn modules inlined; parameters are placeholders).
        example_inputs: its example inputs, as Dynamo passes them.
        options: ``{"plan": ..., "monitor": ..., "inner": ...}`` (see the module docstring).
        mode: ``torch.compile(mode=...)``, forwarded to inductor.

    Returns:
        The compiled callable Dynamo runs in place of the graph.

    Raises:
        BadInputError: an unknown option, a bad ``inner``, a plan that cannot be applied to
            a Dynamo graph (schemas that create or reshape parameters: apply them with
            ``gs.operate``).
    """
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTION_KEYS))
    if unknown:
        raise BadInputError(f"unknown graphsurg backend option(s) {unknown}; known: "
                            f"{list(OPTION_KEYS)}")
    inner = resolve_inner(opts.get("inner"), mode)
    plan = opts.get("plan")
    if plan is not None:
        from .apply_plan import rewrite_dynamo_graph

        gm = rewrite_dynamo_graph(gm, plan)
    monitor = opts.get("monitor")
    if monitor is None:
        return inner(gm, example_inputs)
    from .observe_compiled import MonitorSink, monitor_graph

    if not isinstance(monitor, MonitorSink):
        raise BadInputError(f"options['monitor'] must be a graphsurg.Monitor (or implement "
                            f"graphsurg.passes.fx.observe_compiled.MonitorSink), got "
                            f"{type(monitor).__name__}")
    fn, _ = monitor_graph(monitor, gm, example_inputs, inner)
    return fn


def _register() -> None:
    from torch._dynamo.backends import registry

    if "graphsurg" in registry._COMPILER_FNS:
        return
    # entry-point discovery already knows the name: lookup_backend loads this module and
    # registers graphsurg_backend itself (registering here too would be a duplicate)
    if registry._BACKENDS.get("graphsurg") is not None:
        return
    torch._dynamo.register_backend(graphsurg_backend, name="graphsurg")


_register()

__all__ = ["OPTION_KEYS", "graphsurg_backend", "resolve_inner"]
