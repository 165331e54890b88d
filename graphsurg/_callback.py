"""``gs.SurgeryCallback``: diagnose from a Monitor and operate on the live model in a loop.

Every ``every`` steps the callback asks the monitor for a diagnosis (no extra pass over the
data), plans with ``gs.plan`` on the current batch, and applies the *shape-preserving*
schemas in place on the live model:

* replacements declaring ``live_edit = "parameters"`` (``reinit_dead``): the new values are copied into the live parameters (same
  tensors, so the optimizer and the compiled graphs, which take parameters as inputs, see
  them at once), and the optimizer's moments of the re-initialised slices are zeroed;
* ``live_edit = "module"`` (``activation_swap`` of a module activation): the module is
  replaced in the live model;
  Dynamo's guards on the module tree recompile the graph on the next call (no stale graph).

Schemas that change shapes or add parameters (widen, excise_dead, residual_bypass,
norm_insert, a PReLU swap) are reported in :attr:`SurgeryCallback.history`, not applied:
use ``gs.operate`` between training runs for those. An edit whose output change on the
batch breaks ``certificates.max_output_change`` (or ``exact_tolerance`` for an exact edit)
is rolled back at once. After an edit the monitor's statistics restart.

Utility replacement (opt-in, ``replace_rate > 0``): continual backprop's generate-and-test
(Dohare et al., Nature 2024, Algorithm 1) on every activation site the monitor measures
(found from its first diagnosis; the callback's step 0 is every unit's birth):

* utility: each unit's contribution ``mean|h| x sum|outgoing weights|``
  (:func:`graphsurg.detect.dead.contribution_utility`; mean |h| over the monitor's samples
  since the previous update, the outgoing weights as they are after the optimizer step)
  enters a running average ``u <- eta^n u + (1 - eta^n) contribution`` over the ``n`` steps
  since the previous update (``eta = utility_decay``), with no bias correction. With
  ``utility_every=1`` and a ``Monitor(every=1)`` that is CBP's per-step utility exactly;
  otherwise it is estimated from the samples the monitor took (a window without a sample
  reuses the previous window's mean |h|);
* schedule: CBP's own, step by step, whatever ``utility_every``: every step each unit ages by
  one, the units older than ``maturity`` are eligible, ``replace_rate`` per eligible unit is
  added to the accumulated count and ``int(count)`` of them, lowest utility first, are
  replaced at that step (their age and utility restart at 0 there). The replacements due in
  the ``utility_every`` steps of a window are made at its end, with the ages they would
  have had, so the number replaced per task is CBP's;
* replacement: the library's unit-reinitialising replacement (``reinit_dead``) with CBP's
  generator: fresh incoming weights from the layer's initialiser (``init="layer"``: nn.Linear
  / nn.Conv's kaiming-uniform, a fresh draw for every replacement), bias 0, outgoing weights
  0 (no fold of the unit's mean into the consumer's bias: Algorithm 1 has none); the
  optimizer's moments of exactly those slices are zeroed. It is CBP's rule, not a repair:
  it is not rolled back on the output-change certificate;
* a site under utility replacement leaves its dead units to it (a dead unit has utility 0
  and is replaced first once mature): the periodic diagnosis reports them instead of
  resetting them, as CBP has no second reset.

Units reset by either path restart at age 0.

Under torch.distributed every rank gets the same diagnosis from the monitor and the edits
draw from seeded generators, so every replica makes the same edit.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ._certificates import Certificates
from ._data import InputFn, run_model
from ._errors import BadInputError
from ._monitor import Monitor


@dataclass
class CallbackEvent:
    """What the callback did at one surgery step."""

    step: int
    problems: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # planned, not applied (and why)
    rolled_back: list[str] = field(default_factory=list)
    optimizer_states_reset: int = 0


class SurgeryCallback:
    """Operate on a live, possibly compiled, model from a :class:`Monitor`'s diagnosis.

    Args:
        model: the live ``nn.Module`` (the one ``torch.compile`` wrapped and the optimizer
            trains). Edited in place, only by shape-preserving schemas.
        optimizer: its optimizer; moments of re-initialised slices are zeroed.
        monitor: the :class:`Monitor` passed to the graphsurg backend for ``model``.
        every: operate every ``every`` calls of :meth:`step`.
        certificates: bounds for planning and for keeping an edit (default ``Certificates()``).
        library: replacements to plan with (default ``gs.default_library()``).
        input_fn: ``batch -> (args, kwargs)`` when batches are not ``(inputs, targets)``.
        seed: seeds the edits' random draws (same seed on every rank: the same edits).
        replace_rate: CBP's replacement rate rho: the fraction of mature units replaced per
            step, lowest contribution utility first (0: off, the default). See the module
            docstring for the algorithm (Dohare et al. 2024, Algorithm 1).
        maturity: a unit is eligible for utility replacement when older than this many steps.
        utility_decay: decay per step of the utility's running average (CBP's eta).
        utility_every: update utilities and make the replacements due every this many
            steps (the count and the ages follow CBP step by step; ``1`` with a
            ``Monitor(every=1)``: CBP exactly).

    Example:
        >>> mon = gs.Monitor(every=4)
        >>> cmodel = torch.compile(model, backend="graphsurg", options={"monitor": mon})
        >>> cb = gs.SurgeryCallback(model, opt, mon, every=200)
        >>> for batch in loader:
        ...     loss_fn(cmodel(batch[0]), batch).backward(); opt.step(); opt.zero_grad()
        ...     cb.step(batch)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, monitor: Monitor, *,
                 every: int = 100, certificates: Certificates | None = None,
                 library: Any = None, input_fn: InputFn | None = None, seed: int = 0,
                 replace_rate: float = 0.0, maturity: int = 100, utility_decay: float = 0.99,
                 utility_every: int = 10) -> None:
        if not isinstance(model, nn.Module):
            raise BadInputError(f"model must be the live nn.Module, got {type(model).__name__}")
        if not isinstance(monitor, Monitor):
            raise BadInputError(f"monitor must be a graphsurg.Monitor, got "
                                f"{type(monitor).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise BadInputError(f"SurgeryCallback(every={every!r}): every must be an int >= 1")
        if not (0.0 <= replace_rate < 1.0 and 0.0 <= utility_decay < 1.0):
            raise BadInputError(f"SurgeryCallback(replace_rate={replace_rate!r}, utility_decay="
                                f"{utility_decay!r}): both must be in [0, 1)")
        if not isinstance(utility_every, int) or utility_every < 1 or maturity < 0:
            raise BadInputError(f"SurgeryCallback(utility_every={utility_every!r}, maturity="
                                f"{maturity!r}): utility_every must be an int >= 1, maturity "
                                ">= 0")
        if hasattr(model, "_orig_mod"):
            raise BadInputError("pass the original module, not the torch.compile wrapper "
                                "(model._orig_mod)")
        self.model = model
        self.optimizer = optimizer
        self.monitor = monitor
        self.every = every
        self.certificates = certificates or Certificates()
        self.library = library
        self.input_fn = input_fn
        self.seed = seed
        self.steps = 0
        self.history: list[CallbackEvent] = []
        self.replace_rate, self.maturity = replace_rate, maturity
        self.utility_decay, self.utility_every = utility_decay, utility_every
        #: per producer layer: running utility, age in steps, accumulated replacement count
        self.utility: dict[str, torch.Tensor] = {}
        self.age: dict[str, torch.Tensor] = {}
        self._acc: dict[str, float] = {}
        self._sites: dict[str, Any] = {}  # producer -> activation Site (from the diagnoses)
        self._skip: set[str] = set()  # producers utility replacement cannot treat
        self._sought = False  # whether the sites were looked up before the first round
        self._groups: dict[str, Any] = {}  # producer -> coupling group (consumers)
        self._seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # count, sum |h| so far
        self._mean_abs: dict[str, torch.Tensor] = {}  # mean |h| of the last measured window
        self._accounted: dict[str, int] = {}  # step up to which ages and counts have run
        self.replaced = 0  # replacements made by utility replacement (CBP's count)
        # (first step, schedule): e.g. a RampLeakyReLU's slope, raised over ``every`` steps
        self._on_step: list[tuple[int, Callable[[int, int], None]]] = []

    def step(self, batch: Any) -> CallbackEvent | None:
        """Count a training step; every ``every`` steps, diagnose and operate.

        ``batch`` is the step's batch: the planner calibrates on it (couplings, constant
        units) and the output change of each edit is measured on it.
        """
        self.steps += 1
        for start, f in self._on_step:
            f(self.steps - start, self.every)
        event = None
        if self.replace_rate > 0 and self.steps % self.utility_every == 0:
            event = self._replace_low_utility(batch)
        if self.steps % self.every:
            return event
        return self.operate(batch)

    def operate(self, batch: Any) -> CallbackEvent:
        """Diagnose from the monitor and apply the in-place schemas now."""
        from ._plan import SurgeryFailed, plan

        event = CallbackEvent(self.steps)
        self.history.append(event)
        if self.monitor.sampled == 0:
            event.reported.append("the monitor has measured nothing yet")
            return event
        diagnosis = self.monitor.diagnose()
        if self.replace_rate > 0:
            self._learn_sites(diagnosis)
        # every round diagnoses a fresh window: statistics since the last round only. After an
        # edit, older statistics describe a model that no longer exists; without an edit, a
        # cumulative window hides units that die late (their early firing keeps them "alive").
        self.monitor.reset()
        self._seen.clear()
        event.problems = [f"{p.kind} at {p.site.address}" for p in diagnosis.problems]
        if self.replace_rate > 0:
            # CBP's generate-and-test is the only reset at its sites: their dead units have
            # utility 0 and are the first it replaces once mature
            left = [p for p in diagnosis.problems
                    if p.kind == "DeadNeurons" and p.site.module in self.utility]
            event.reported += [f"{p.kind} at {p.site.address}: left to utility replacement"
                               for p in left]
            diagnosis = dataclasses.replace(
                diagnosis, problems=[p for p in diagnosis.problems if p not in left])
        if not diagnosis.problems:
            return event
        from .library import default_library

        lib = self.library if self.library is not None else default_library()
        try:
            surgery = plan(self.model, diagnosis, library=lib,
                           certificates=self.certificates, data=[batch],
                           input_fn=self.input_fn, seed=self.seed, probe=False,
                           prefer=[r.name for r in lib if r.live_edit])
        except SurgeryFailed as e:
            event.reported.append(f"no plan: {e}")
            return event
        for schema in surgery.schemas:
            label = f"{schema.replacement} at {schema.site.module}"
            if schema.replacement not in lib or not lib.get(schema.replacement).live_editable(
                    schema.params):
                event.reported.append(f"{label}: changes shapes or adds parameters; apply it "
                                      "with gs.operate")
                continue
            outcome = self._apply(schema, batch, event)
            if outcome == "applied":
                event.applied.append(label)
                self._restart(schema.site.module, schema.problem.units)
            else:
                event.rolled_back.append(f"{label}: {outcome}")
        for p, why in surgery.untreated:
            event.reported.append(f"{p.kind} at {p.site.address}: untreated ({why})")
        return event

    # -- continual backprop's utility replacement -------------------------------------------
    def _restart(self, module: str, units: Any) -> None:
        """Units re-initialised at ``module``: age and utility 0."""
        if module in self.age and units:
            idx = torch.tensor([int(u) for u in units], dtype=torch.long)
            self.age[module][idx] = 0.0
            self.utility[module][idx] = 0.0

    def _learn_sites(self, diagnosis: Any) -> None:
        """Add the activation sites of ``diagnosis`` to those under utility replacement."""
        self._sites.update({r.site.module: r.site for r in diagnosis.layers.values()
                            if r.kind == "activation" and r.site.module
                            and r.site.module not in self._skip})

    def _replace_low_utility(self, batch: Any) -> CallbackEvent | None:
        """Update every known site's running utility, run CBP's per-step schedule over the
        steps since the last update and make the replacements it calls for (continual
        backprop's generate-and-test; see the module docstring)."""
        from ._problems import Problem
        from .detect.dead import contribution_utility
        from .library import Target, default_library
        from .library._base import Refused
        from .library._edit import coupled, get_layer, weight_rows

        if not self._sites and not self._sought and self.monitor.sampled > 0:
            self._sought = True  # the sites, before the first round (later: each round's)
            self._learn_sites(self.monitor.diagnose())
        if not self._sites:
            return None
        lib = self.library if self.library is not None else default_library()
        resetters = [r for r in lib if r.reinitialises_units and r.live_edit == "parameters"]
        if not resetters:
            return None
        stats = {addr.rpartition(":")[0]: st for addr, st in self.monitor.stats().items()}
        target = Target(self.model, [batch], input_fn=self.input_fn, seed=self.seed)
        event: CallbackEvent | None = None
        for module, site in list(self._sites.items()):
            st = stats.get(module)
            if st is not None and int(st.count.max()) == 0:
                st = None  # nothing measured since the monitor's last reset
            if st is not None and (module not in self.utility
                                   or self.utility[module].numel() != int(st.channels)):
                width = int(st.channels)  # a new site (born at step 0) or a resized layer
                self.utility[module] = torch.zeros(width, dtype=torch.float64)
                self.age[module] = torch.zeros(width, dtype=torch.float64)
                self._acc[module] = 0.0
                self._accounted[module] = 0 if module not in self._accounted else self.steps
                self._mean_abs.pop(module, None)
                self._seen.pop(module, None)
            if module not in self.utility:
                continue  # not measured yet: its steps are accounted for when it is
            width = self.utility[module].numel()
            try:
                group = self._groups.get(module) or coupled(target, module)
                self._groups[module] = group
                mass = torch.zeros(width, dtype=torch.float64)
                for c in group.consumers:
                    w = weight_rows(get_layer(target, c.module, grouped=True))
                    for j in range(width):
                        rows, cols = c.weight_index(j, w.shape)
                        mass[j] += float(w.detach()[rows, cols].abs().sum())
            except (Refused, ValueError, AttributeError) as e:
                self._sites.pop(module, None)
                self._skip.add(module)
                for d in (self.utility, self.age, self._acc, self._accounted):
                    d.pop(module, None)
                event = event or self._event()
                event.reported.append(f"utility replacement at {module}: skipped ({e})")
                continue
            if st is not None:
                self._window_mean_abs(module, st)
            n_steps = self.steps - self._accounted[module]
            self._accounted[module] = self.steps
            mean_abs = self._mean_abs.get(module)
            if n_steps <= 0 or mean_abs is None:
                continue
            decay = self.utility_decay ** n_steps
            self.utility[module].mul_(decay).add_(
                (1 - decay) * contribution_utility(mean_abs, mass))
            units, count, before = self._schedule(module, n_steps)
            if not units:
                continue
            u = before[0]
            problem = Problem("DeadNeurons", site, severity=len(units) / width,
                              units=tuple(units), evidence={"width": width, "utility": [
                                  float(u[i]) for i in units], "source": "utility"})
            r = resetters[0]
            event = event or self._event()
            label = f"{r.name} at {module} (utility, {len(units)} unit(s))"
            seed = self.seed * 1_000_033 + self.steps  # a fresh draw for every replacement
            # CBP's generator: the layer's initialiser, outgoing weights 0, no fold (the
            # replacement checks the units and their consumers itself)
            params = {"units": units, "init": "layer", "unit_means": [0.0] * len(units),
                      "exact": False}
            schema = SimpleNamespace(replacement=r.name, problem=problem, params=params)
            outcome = self._apply(schema, batch, event, seed=seed, certify=False)
            if outcome == "applied":
                event.applied.append(label)
                self.replaced += count
            else:  # not replaced: the units keep their age and utility
                idx = torch.tensor(units, dtype=torch.long)
                self.utility[module][idx] = u[idx]
                self.age[module][idx] = before[1][idx] + n_steps
                event.rolled_back.append(f"{label}: {outcome}")
        return event

    def _window_mean_abs(self, module: str, st: Any) -> None:
        """Mean |h| per unit over the monitor's samples since the previous update (its
        statistics are cumulative since its last reset); units without a new sample keep
        the previous window's value."""
        n = st.count.to(torch.float64)
        tot = st.mean_abs.to(torch.float64) * n
        n0, tot0 = self._seen.get(module, (None, None))
        if n0 is not None and tot0 is not None and n0.shape == n.shape and bool(
                (n >= n0).all()):
            dn, dtot = n - n0, tot - tot0
        else:  # first window, or the monitor restarted since
            dn, dtot = n, tot
        self._seen[module] = (n, tot)
        new = dtot / dn.clamp_min(1.0)
        prev = self._mean_abs.get(module)
        if prev is not None and prev.shape == new.shape:
            new = torch.where(dn > 0, new, prev)
        elif not bool((dn > 0).all()):
            new = torch.where(dn > 0, new, tot / n.clamp_min(1.0))
        if bool((n > 0).any()):
            self._mean_abs[module] = new

    def _schedule(self, module: str, n_steps: int
                  ) -> tuple[list[int], int, tuple[torch.Tensor, torch.Tensor]]:
        """CBP's schedule over ``n_steps`` steps at ``module``, step by step: ages +1, the
        eligible units (age > maturity) add ``replace_rate`` each to the accumulated count,
        ``int(count)`` of them, lowest utility first, are replaced (age and utility 0 from
        that step on). Returns the units to re-initialise now, how many replacements were
        due (a unit can be due twice when ``maturity < n_steps``) and the (utility, age)
        before the window's replacements."""
        from .detect.dead import lowest_utility

        u, age = self.utility[module], self.age[module]
        before = (u.clone(), age.clone())
        chosen: set[int] = set()
        count = 0
        for _ in range(n_steps):
            age += 1
            eligible = age > self.maturity
            n_eligible = int(eligible.sum())
            if n_eligible == 0:
                continue
            self._acc[module] += self.replace_rate * n_eligible
            k = int(self._acc[module])
            if k < 1:
                continue
            self._acc[module] -= k
            units = lowest_utility(u, eligible, k)
            if units:
                idx = torch.tensor(units, dtype=torch.long)
                age[idx] = 0.0
                u[idx] = 0.0
                chosen.update(units)
                count += len(units)
        return sorted(chosen), count, before

    def _event(self) -> CallbackEvent:
        event = CallbackEvent(self.steps)
        self.history.append(event)
        return event

    # -- one schema ---------------------------------------------------------------------------
    def _apply(self, schema: Any, batch: Any, event: CallbackEvent, *, seed: int | None = None,
               certify: bool = True) -> str:
        """Apply one schema to the live model. ``certify=False`` (CBP's replacement, a rule
        rather than a repair): no output-change check, and a consumer bias the edit did not
        change (no fold) keeps its optimizer moments."""
        from .library import Target, default_library
        from .library._base import Refused

        lib = self.library if self.library is not None else default_library()
        work = copy.deepcopy(self.model)
        target = Target(work, [batch], input_fn=self.input_fn,
                        seed=self.seed if seed is None else seed)
        replacement = lib.get(schema.replacement)
        try:
            applied = replacement.apply(target, schema.problem, schema.params)
        except Refused as e:
            return f"refused ({e})"
        if not certify and not any(float(v) for v in schema.params.get("unit_means") or ()):
            for c in applied.details.get("consumers") or ():
                applied.touched.pop(f"{c}.bias", None)
        before = self._output(batch) if certify else None
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        swapped: list[tuple[str, nn.Module]] = []
        if replacement.live_edit == "module":
            where = str(applied.details.get("module", ""))
            try:
                new = target.model.get_submodule(where)
                old = self.model.get_submodule(where)
            except AttributeError:
                return "refused (a functional activation cannot be swapped in a live module)"
            if list(new.parameters()):
                return "refused (the new activation has parameters)"
            _set_module(self.model, where, new)
            swapped.append((where, old))
            if applied.on_step is not None:
                self._on_step.append((self.steps, applied.on_step))
        else:
            live = dict(self.model.named_parameters())
            live_b = dict(self.model.named_buffers())
            with torch.no_grad():
                for name, t in list(target.model.named_parameters()) + list(
                        target.model.named_buffers()):
                    dst = live.get(name, live_b.get(name))
                    if dst is not None and dst.shape == t.shape and not torch.equal(dst, t):
                        dst.copy_(t)
        change, bound = 0.0, 0.0
        if before is not None:
            change = _relative_change(before, self._output(batch))
            bound = (self.certificates.exact_tolerance if applied.exact
                     else self.certificates.max_output_change)
        if change > bound:
            with torch.no_grad():
                for where, old in swapped:
                    _set_module(self.model, where, old)
                self.model.load_state_dict(saved)
            return f"rolled back: output change {change:.3g} > {bound:.3g}"
        from ._operate import reset_optimizer_state

        result: Any = SimpleNamespace(model=self.model, applied={0: applied})
        event.optimizer_states_reset += reset_optimizer_state(self.optimizer, result)
        return "applied"

    @torch.no_grad()
    def _output(self, batch: Any) -> torch.Tensor:
        out = run_model(self.model, batch, self.input_fn, 0)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            out = getattr(out, "logits", None) or next(iter(out.values()))
        return out.detach().to(torch.float64)


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    new.train(getattr(parent, name).training)
    setattr(parent, name, new)


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.norm())
    return float((b - a).norm()) / den if den > 0 else float((b - a).norm())


__all__ = ["CallbackEvent", "SurgeryCallback"]
