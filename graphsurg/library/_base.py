"""The replacement interface, the patient on the table (:class:`Target`) and the library.

A :class:`Replacement` declares which problem kinds it treats, at which scales, and what it
guarantees (``"exact"``: the function is unchanged at the moment of surgery, up to float
round-off; ``"bounded"``: it changes, the change is measured and checked against the
certificates). ``check`` refuses with a reason, ``propose`` picks parameters, ``apply`` edits
the :class:`Target`'s model (always a private copy) and returns an :class:`Applied` record:
what changed, which parameter slices were re-initialised (for
:func:`graphsurg.reset_optimizer_state`) and which parameters are new.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._errors import Refused as Refused
from .._problems import Problem
from ..passes.fx.target import Target as Target

Batch = Any
SCALES: tuple[str, ...] = ("neuron", "layer", "block", "module")


@dataclass
class Applied:
    """What one applied schema did to the model.

    Attributes:
        exact: the edit preserves the function at the moment of surgery (on the data).
        modules: module paths whose parameters the edit changed or created (verified for
            gradient flow).
        new_parameters: names (in the result model) of parameters the edit created.
        touched: parameter name -> list of ``(dim, indices)`` slices re-initialised in place
            (Adam moments for them are stale: see :func:`graphsurg.reset_optimizer_state`).
        units: the units treated at the site (for the dead-unit certificate).
        on_step: called as ``on_step(step, total)`` during healing (e.g. a slope ramp).
        details: numbers for the report (JSON-serialisable).
    """

    exact: bool
    modules: list[str] = field(default_factory=list)
    new_parameters: list[str] = field(default_factory=list)
    touched: dict[str, list[tuple[int, list[int]]]] = field(default_factory=dict)
    units: list[int] = field(default_factory=list)
    on_step: Callable[[int, int], None] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def touch(self, param: str, dim: int, indices: Sequence[int]) -> None:
        self.touched.setdefault(param, []).append((dim, [int(i) for i in indices]))


class Replacement:
    """A library entry. Subclass it and set the class attributes; see the module docstring.

    Class attributes:
        name: unique key in a :class:`Library` (and in plans on disk).
        treats: problem kinds it treats.
        scales: the scopes it operates at (``neuron``, ``layer``, ``block``, ``module``).
        guarantee: ``"exact"`` or ``"bounded"`` for the default parameters.
        judged_after_healing: the edit only helps once trained (a zero-initialised gate):
            operate heals before judging it, even when it is exact.
        priority: lower is preferred among replacements treating the same problem.
        reasons: problem kind -> the evidence ``reason`` values it treats (a kind not listed:
            every reason). E.g. ``{"Bottleneck": ("rank",)}``: only rank-collapsed weights.
        removes_units: the edit deletes the site's units (the dead-unit certificate does not
            apply to them: they are gone, not revived).
        renumbers_units: the edit changes the site layer's width or structure, so another
            schema's unit indices or module path at that layer no longer hold.
        reinitialises_units: the edit re-draws units in place (shapes unchanged); within a
            site it runs before layer-scale edits, while unit indices are still valid.
        reinit_companion: plan it together with the replacement that
            ``reinitialises_units`` for the same problem (a swap revives future updates, the
            re-init revives the units now).
        preserves_width: the layer keeps its width and parameter shapes.
        live_edit: how :class:`graphsurg.SurgeryCallback` applies it to a live model:
            ``"parameters"`` (new values copied into the live tensors), ``"module"`` (a
            parameter-free module swapped at ``Applied.details["module"]``) or None (not on a
            live model: use ``gs.operate``).
        graph_level: it has variants the torch.compile backend and ``apply_plan`` can rewrite
            in a graph whose parameters are inputs (see :meth:`graph_rewrite`).
        escalation_only: planned only by escalation or when named in ``prefer=``.
        fallback_needs_healing: its exact fallback is exact only because it starts as a
            no-op and acts through healing (a slope ramp): not planned where the adapter
            cannot train (ONNX).
    """

    name: ClassVar[str] = ""
    treats: ClassVar[tuple[str, ...]] = ()
    scales: ClassVar[tuple[str, ...]] = ()
    guarantee: ClassVar[str] = "bounded"
    judged_after_healing: ClassVar[bool] = False
    priority: ClassVar[int] = 100
    reasons: ClassVar[dict[str, tuple[str, ...]]] = {}
    removes_units: ClassVar[bool] = False
    renumbers_units: ClassVar[bool] = False
    reinitialises_units: ClassVar[bool] = False
    reinit_companion: ClassVar[bool] = False
    preserves_width: ClassVar[bool] = True
    live_edit: ClassVar[str | None] = None
    graph_level: ClassVar[bool] = False
    escalation_only: ClassVar[bool] = False
    fallback_needs_healing: ClassVar[bool] = False

    @property
    def scale(self) -> str:
        """The replacement's (smallest) scale."""
        return self.scales[0] if self.scales else "layer"

    def accepts(self, problem: Problem) -> bool:
        """Whether the problem's kind and evidence ``reason`` are among what it treats."""
        if problem.kind not in self.treats:
            return False
        wanted = self.reasons.get(problem.kind)
        return wanted is None or problem.evidence.get("reason") in wanted

    def structural_params(self, problem: Problem, exact: bool) -> dict[str, Any]:
        """Parameters that can be chosen without data (planning without calibration)."""
        return {}

    def graph_rewrite(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """The edit as a graph-level rewrite (JSON), or None when it needs new or reshaped
        parameters. Only ``graph_level`` replacements return one."""
        return None

    def live_editable(self, params: dict[str, Any]) -> bool:
        """Whether the edit with ``params`` can be applied to a live model (``live_edit``)."""
        return self.live_edit is not None

    def check(self, problem: Problem, target: Target) -> str | None:
        """None when the replacement can treat ``problem`` on ``target``, else the reason."""
        if problem.kind not in self.treats:
            return f"{self.name} does not treat {problem.kind}"
        if not self.accepts(problem):
            return (f"{self.name} treats {problem.kind} with reason "
                    f"{'/'.join(self.reasons[problem.kind])}, not "
                    f"{problem.evidence.get('reason')!r}")
        return None

    def propose(self, problem: Problem, target: Target, *, exact: bool = False
                ) -> dict[str, Any]:
        """Parameters for a schema (JSON-serialisable). ``exact``: the certificates demand a
        function-preserving edit."""
        return {}

    def is_exact(self, params: dict[str, Any]) -> bool:
        """Whether the edit with ``params`` preserves the function at surgery."""
        return bool(params.get("exact", self.guarantee == "exact"))

    def exact_fallback(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """Parameters of an exact variant to try when the bounded one moves the output too
        far (None: there is none)."""
        return None

    def apply(self, target: Any, problem: Problem, params: dict[str, Any]) -> Applied:
        """Edit ``target.model`` in place with the applier for ``target.ir`` (``apply_torch``
        for a torch :class:`Target`, ``apply_onnx`` for an ONNX target); raise
        :class:`Refused` with the reason if not possible (the caller restores the model)."""
        ir = getattr(target, "ir", "torch")
        if not self.supports(ir):
            raise Refused(f"replacement {self.name!r} has no {ir} applier")
        fn: Callable[[Any, Problem, dict[str, Any]], Applied] = getattr(self, f"apply_{ir}")
        return fn(target, problem, params)

    def supports(self, ir: str) -> bool:
        """Whether the replacement has an applier for ``ir`` (``"torch"``, ``"onnx"``)."""
        if ir == "torch" and type(self).apply is not Replacement.apply:
            return True  # a user's replacement that overrides apply() itself (torch)
        own = getattr(type(self), f"apply_{ir}", None)
        return own is not None and own is not getattr(Replacement, f"apply_{ir}", None)

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        """The torch applier: edit ``target.model`` (an ``nn.Module``) in place."""
        raise Refused(f"replacement {self.name!r} ({type(self).__name__}) has no torch applier")

    def apply_onnx(self, target: Any, problem: Problem, params: dict[str, Any]) -> Applied:
        """The ONNX applier: edit ``target.model`` (an ``onnx_ir.Model``) in place."""
        raise Refused(f"replacement {self.name!r} ({type(self).__name__}) has no onnx applier")

    def describe(self) -> str:
        return (self.__doc__ or self.name).strip().splitlines()[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, treats={self.treats}, "
                f"scales={self.scales}, guarantee={self.guarantee!r})")


class Library:
    """An ordered collection of replacements, keyed by name.

    Example::

        lib = gs.default_library()
        lib.register(MyReplacement())
        gs.operate(model, data, loss_fn=loss, library=lib)
    """

    def __init__(self, replacements: Sequence[Replacement] = ()) -> None:
        self._items: dict[str, Replacement] = {}
        for r in replacements:
            self.register(r)

    def register(self, replacement: Replacement, *, replace: bool = False) -> Replacement:
        """Add a replacement; ``replace=True`` overrides one with the same name."""
        if not isinstance(replacement, Replacement):
            raise TypeError(f"register() takes a graphsurg Replacement, got "
                            f"{type(replacement).__name__}")
        if not replacement.name:
            raise ValueError(f"{type(replacement).__name__} has no name: set the class "
                             "attribute `name`")
        bad = [s for s in replacement.scales if s not in SCALES]
        if bad or not replacement.treats:
            raise ValueError(f"replacement {replacement.name!r} must declare treats= and scales= "
                             f"from {SCALES} (got scales {replacement.scales})")
        if replacement.name in self._items and not replace:
            raise ValueError(f"a replacement named {replacement.name!r} is already registered; "
                             "pass replace=True to override it")
        self._items[replacement.name] = replacement
        return replacement

    def get(self, name: str) -> Replacement:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"no replacement named {name!r} in the library; known: "
                           f"{', '.join(self._items)}") from None

    def treating(self, kind: str, ir: str | None = None) -> list[Replacement]:
        """The replacements that treat ``kind`` (with an applier for ``ir`` when given),
        preferred first."""
        return sorted((r for r in self._items.values()
                       if kind in r.treats and (ir is None or r.supports(ir))),
                      key=lambda r: (r.priority, r.name))

    def names(self) -> list[str]:
        return list(self._items)

    def copy(self) -> Library:
        return Library([copy.copy(r) for r in self._items.values()])

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[Replacement]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Library({', '.join(self._items)})"
