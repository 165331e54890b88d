"""The torch model on the table: :class:`Target`, what the library's torch appliers edit.

A private copy of the user's model, its calibration batches and the structural helpers
(channel coupling, the FX graph, module replacement and insertion) every torch applier uses.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from graphsurg._data import InputFn, default_input_fn
from graphsurg._errors import Refused

from . import coupling as _coupling

Batch = Any


class Target:
    """The model on the table: a private copy, its calibration batches and helpers.

    Replacements read and edit ``target.model``; graph rewrites swap it for a GraphModule with
    :meth:`set_model`. Nothing here touches the user's model.
    """

    ir = "torch"

    def __init__(self, model: nn.Module, batches: Sequence[Batch], *,
                 input_fn: InputFn | None = None, seed: int = 0) -> None:
        if not batches:
            raise ValueError("a Target needs at least one calibration batch")
        self.model = model
        self.batches = list(batches)
        self.input_fn = input_fn or default_input_fn
        self.seed = seed
        self._groups: dict[tuple[str, tuple[int, ...], tuple[str, ...]],
                           _coupling.CouplingGroup] = {}
        self._gm: tuple[fx.GraphModule | None, str] | None = None
        self._ep: tuple[fx.GraphModule | None, str] | None = None

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
    def coupling(self, producer: str, units: Iterable[int] = (), partners: Iterable[str] = ()
                 ) -> _coupling.CouplingGroup:
        """The channel-coupling group of ``producer`` in the current model (cached), proven at
        ``units`` (the units an edit will touch) when it has to be measured; ``partners``: a
        gated unit's other projections (see :class:`~.coupling.CouplingGroup`)."""
        key = (producer, tuple(sorted({int(u) for u in units})),
               tuple(sorted({str(p) for p in partners} - {producer})))
        if key not in self._groups:
            self._groups[key] = _coupling.analyze(
                self.model, producer, lambda m: self.run(m), self.example(), units=key[1],
                partners=key[2])
        return self._groups[key]

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
                except Exception as e:  # reported as the reason
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
        self._ep = None

    def exported(self) -> tuple[fx.GraphModule | None, str]:
        """The current model's ``torch.export`` graph (eval mode, first calibration batch),
        or ``(None, reason)``. It is a map of the module tree (``nn_module_stack``); edits
        go to the modules (:meth:`attach_after`, :meth:`attach_skip`)."""
        if self._ep is None:
            args, kwargs = self.example()
            was = self.model.training
            self.model.eval()
            try:
                ep = torch.export.export(self.model, tuple(args), dict(kwargs), strict=False)
                self._ep = (ep.graph_module, "")
            except Exception as e:  # export failures are reported as the reason
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self._ep = (None, f"torch.export failed ({type(e).__name__}: {msg[:160]})")
            finally:
                self.model.train(was)
        return self._ep

    def module_block(self, path: str) -> tuple[str, list[str]]:
        """``(end, modules)`` of the block of layer ``path`` read from the exported graph
        (:func:`~graphsurg.passes.fx.rewrite.exported_block`), or :class:`Refused`."""
        from .rewrite import RewriteError, exported_block

        gm, reason = self.exported()
        if gm is None:
            raise Refused(f"no graph of the model: {reason}")
        try:
            return exported_block(gm, path)
        except RewriteError as e:
            raise Refused(str(e)) from None

    @torch.no_grad()
    def io_shapes(self, start: str, end: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``start``'s input and ``end``'s output on the first calibration batch."""
        got: dict[str, tuple[int, ...]] = {}

        def pre(m: nn.Module, a: tuple[Any, ...]) -> None:
            got.setdefault("in", tuple(a[0].shape))

        def post(m: nn.Module, a: tuple[Any, ...], o: torch.Tensor) -> None:
            got.setdefault("out", tuple(o.shape))

        h1 = self.model.get_submodule(start).register_forward_pre_hook(pre)
        h2 = self.model.get_submodule(end).register_forward_hook(post)
        was = self.model.training
        self.model.eval()
        try:
            self.run()
        finally:
            h1.remove()
            h2.remove()
            self.model.train(was)
        if "in" not in got or "out" not in got:
            raise Refused(f"modules {start!r} / {end!r} are not called when the model runs")
        return got["in"], got["out"]

    def attach_after(self, path: str, new: nn.Module, prefix: str) -> str:
        """Run ``new`` on the output of module ``path`` (a forward hook; ``new`` becomes its
        child, no existing parameter is renamed). Returns ``new``'s path."""
        from .rewrite import attach_after

        new.train(self.model.training)
        name = attach_after(self.model, path, new, prefix)
        self.invalidate()
        return name

    def attach_skip(self, start: str, end: str, branch: nn.Module, prefix: str) -> str:
        """Add ``branch(start's input)`` to ``end``'s output (forward hooks; ``branch``
        becomes a child of ``end``, no existing parameter is renamed). Returns its path."""
        from .rewrite import attach_skip

        branch.train(self.model.training)
        name = attach_skip(self.model, start, end, branch, prefix)
        self.invalidate()
        return name

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
        from .rewrite import RewriteError, block_bounds
        from .rewrite import insert_after as _insert_after

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
