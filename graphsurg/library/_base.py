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
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from .._data import InputFn, default_input_fn
from .._diagnosis import Problem
from .._errors import GraphsurgError
from ..passes.fx import coupling as _coupling

Batch = Any
SCALES: tuple[str, ...] = ("neuron", "layer", "block", "module")


class Refused(GraphsurgError):
    """A replacement cannot be applied at a site; the message says why."""


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


class Target:
    """The model on the table: a private copy, its calibration batches and helpers.

    Replacements read and edit ``target.model``; graph rewrites swap it for a GraphModule with
    :meth:`set_model`. Nothing here touches the user's model.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], *,
                 input_fn: InputFn | None = None, seed: int = 0) -> None:
        if not batches:
            raise ValueError("a Target needs at least one calibration batch")
        self.model = model
        self.batches = list(batches)
        self.input_fn = input_fn or default_input_fn
        self.seed = seed
        self._groups: dict[str, _coupling.CouplingGroup] = {}
        self._gm: tuple[fx.GraphModule | None, str] | None = None

    # -- running ---------------------------------------------------------------------------
    def example(self, i: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.input_fn(self.batches[i])

    def run(self, model: nn.Module | None = None, batch: Batch | None = None) -> Any:
        args, kwargs = self.input_fn(self.batches[0] if batch is None else batch)
        return (model or self.model)(*args, **kwargs)

    @torch.no_grad()
    def capture(self, path: str, *, output: bool = False, batches: int = 2) -> torch.Tensor:
        """The input (or output) of module ``path`` on up to ``batches`` calibration batches,
        concatenated along dim 0, with the model in eval mode (mode restored)."""
        mod = self.model.get_submodule(path)
        got: list[torch.Tensor] = []

        def pre(m: nn.Module, args: tuple[Any, ...]) -> None:
            if not output:
                got.append(args[0].detach())

        def post(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if output:
                got.append(out.detach())

        h1 = mod.register_forward_pre_hook(pre)
        h2 = mod.register_forward_hook(post)
        was = self.model.training
        self.model.eval()
        try:
            for b in self.batches[:batches]:
                self.run(batch=b)
        finally:
            h1.remove()
            h2.remove()
            self.model.train(was)
        if not got:
            raise Refused(f"module {path!r} is not called when the model runs")
        return torch.cat(got, 0)

    # -- structure -------------------------------------------------------------------------
    def coupling(self, producer: str) -> _coupling.CouplingGroup:
        """The channel-coupling group of ``producer`` in the current model (cached)."""
        if producer not in self._groups:
            self._groups[producer] = _coupling.analyze(
                self.model, producer, lambda m: self.run(m), self.example())
        return self._groups[producer]

    def graph_module(self) -> tuple[fx.GraphModule | None, str]:
        """The current model as a shape-propagated GraphModule, or ``(None, reason)``.

        The GraphModule shares its submodules with ``self.model``.
        """
        if self._gm is None:
            gm, why = _coupling.trace(self.model)
            if gm is not None:
                was = self.model.training
                gm.eval()
                try:
                    _coupling.propagate_shapes(gm, *self.example())
                except Exception as e:  # noqa: BLE001 - reported as the reason
                    gm, why = None, f"shape propagation failed ({type(e).__name__}: {e})"
                finally:
                    self.model.train(was)
                    if gm is not None:
                        gm.train(was)
            self._gm = (gm, why)
        return self._gm

    def set_model(self, model: nn.Module) -> None:
        """Replace the model (after a graph rewrite) and forget cached analyses."""
        self.model = model
        self.invalidate()

    def invalidate(self) -> None:
        self._groups.clear()
        self._gm = None

    def replace_module(self, path: str, new: nn.Module) -> None:
        """Put ``new`` at ``path`` (keeping the old module's training mode)."""
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        old = getattr(parent, name)
        new.train(old.training)
        setattr(parent, name, new)
        self.invalidate()

    def insert_after(self, path: str, new: nn.Module, mode: str, prefix: str) -> str:
        """Insert ``new`` right after the site ``path`` and return where it now lives.

        ``mode="fx"``: on the FX graph, after the block of ``path`` (the layer and its
        activation); otherwise the module at ``path`` becomes ``Sequential(old, new)`` and
        ``new`` lives at ``path.1``. Raises :class:`Refused` with the reason when neither
        can be done.
        """
        from ..passes.fx.rewrite import RewriteError, block_bounds
        from ..passes.fx.rewrite import insert_after as _insert_after

        if mode == "fx":
            gm, reason = self.graph_module()
            if gm is None:
                raise Refused(f"no torch.fx graph: {reason}")
            try:
                _, end = block_bounds(gm, path)
            except RewriteError as e:
                raise Refused(str(e)) from None
            name = _insert_after(gm, end, new, f"{prefix}_{path}")
            new.train(gm.training)
            self.set_model(gm)
            return name
        try:
            old = self.model.get_submodule(path)
        except AttributeError:
            raise Refused(f"the model has no module {path!r}") from None
        self.replace_module(path, nn.Sequential(old, new))
        return f"{path}.1"

    def generator(self, salt: str | int) -> torch.Generator:
        """A CPU generator seeded from the target's seed and ``salt`` (stable across runs)."""
        s = zlib.crc32(str(salt).encode()) if isinstance(salt, str) else int(salt)
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + s)


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
    """

    name: ClassVar[str] = ""
    treats: ClassVar[tuple[str, ...]] = ()
    scales: ClassVar[tuple[str, ...]] = ()
    guarantee: ClassVar[str] = "bounded"
    judged_after_healing: ClassVar[bool] = False
    priority: ClassVar[int] = 100

    def check(self, problem: Problem, target: Target) -> str | None:
        """None when the replacement can treat ``problem`` on ``target``, else the reason."""
        if problem.kind not in self.treats:
            return f"{self.name} does not treat {problem.kind}"
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

    def apply(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        """Edit ``target.model`` in place; raise :class:`Refused` with the reason if not
        possible (the caller restores the model). Every replacement overrides it; one that
        does not is refused per schema, like any replacement that cannot apply."""
        raise Refused(f"replacement {self.name!r} ({type(self).__name__}) defines no apply()")

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

    def treating(self, kind: str) -> list[Replacement]:
        """The replacements that treat ``kind``, preferred first."""
        return sorted((r for r in self._items.values() if kind in r.treats),
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
