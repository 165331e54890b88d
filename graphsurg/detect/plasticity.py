"""LostPlasticity: a head whose units went dormant while the loss stopped improving.

Plasticity loss (Nikishin et al. 2023; Dohare et al. 2024) is a property of training, not of
one pass over the data, so this detector reads a finished :class:`graphsurg.Diagnosis` of the
model and, optionally, the recent training-loss history. The head (a module path given by the
caller, e.g. ``"classifier"``) has lost plasticity when

* an activation site inside it has at least ``dormant_fraction`` of its units dormant (ReDo score <= ``DiagnoseConfig.dormant_tau``), and
* when ``losses`` is given, the loss improved by less than ``stall`` (relative) between the
  first and the last quarter of the window.

The gradient norms of the head's layers are kept as evidence. Add the problem to a diagnosis
to plan :class:`graphsurg.library.PlasticityInjection`.
"""

from __future__ import annotations

from collections.abc import Sequence

from graphsurg._problems import Diagnosis, Problem, Site


def detect_lost_plasticity(diagnosis: Diagnosis, *, head: str,
                           losses: Sequence[float] | None = None,
                           dormant_fraction: float = 0.5, stall: float = 0.01
                           ) -> list[Problem]:
    """``[Problem("LostPlasticity", Site(head))]`` when the head has lost plasticity, else
    ``[]`` (see the module docstring)."""
    pre = head + "."
    acts = [r for r in diagnosis.layers.values() if r.kind == "activation"
            and (r.site.module == head or r.site.module.startswith(pre))]
    if not acts:
        return []
    frac = max(r.dead_fraction for r in acts)
    if frac < dormant_fraction:
        return []
    ev: dict[str, object] = {
        "head": head, "dormant_fraction": frac, "sites": [r.site.address for r in acts],
        "grad_norms": {r.site.module: r.grad_norm for r in diagnosis.layers.values()
                       if r.kind == "parameters" and (r.site.module == head or
                                                      r.site.module.startswith(pre))}}
    if losses is not None and len(losses) >= 4:
        q = max(1, len(losses) // 4)
        first = sum(losses[:q]) / q
        last = sum(losses[-q:]) / q
        gain = (first - last) / max(abs(first), 1e-12)
        ev["loss_improvement"] = gain
        if gain >= stall:
            return []
    return [Problem("LostPlasticity", Site(head, ir=acts[0].site.ir), severity=min(1.0, frac),
                    evidence=ev)]
