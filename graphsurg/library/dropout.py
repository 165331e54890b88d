"""Dropout (layer scale): for over-fitting, exact at inference.

``Overfitting`` is diagnosed when held-out data is given (``gs.diagnose(...,
val_data=...)``): the held-out loss exceeds the training loss by more than
``DiagnoseConfig.overfit_gap`` (relative), localised to the layers whose units co-adapt
(pairs of units with ``|corr| > DiagnoseConfig.coadapt_corr`` over the data). This
replacement puts ``nn.Dropout(p)`` after the site's layer block (layer + activation) on a
``torch.fx``-traceable model, or wraps the site's module (``Sequential(module, Dropout)``).

Dropout is the identity in eval mode, so the edit is exact at inference: it changes training
only (the report says so), and it is judged after healing like the other edits that work
through training.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._problems import Problem
from ..passes.fx.rewrite import RewriteError, block_bounds
from ._base import Applied, Replacement, Target


class Dropout(Replacement):
    """Insert dropout after a co-adapting layer (identity in eval mode: exact at inference)."""

    name = "dropout"
    treats = ("Overfitting",)
    scales = ("layer",)
    guarantee = "exact"
    judged_after_healing = True
    priority = 20

    def __init__(self, p: float = 0.1) -> None:
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout probability must be in (0, 1), got {p}")
        self.p = p

    def check(self, problem: Problem, target: Target) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        try:
            target.model.get_submodule(problem.site.module)
        except AttributeError:
            return f"the model has no module {problem.site.module!r}"
        return None

    def propose(self, problem: Problem, target: Target, *, exact: bool = False
                ) -> dict[str, Any]:
        gm, _ = target.graph_module()
        mode = "wrap"
        if gm is not None:
            try:
                block_bounds(gm, problem.site.module)
                mode = "fx"
            except RewriteError:
                pass
        # more co-adaptation, more dropout (0.1 .. 0.3)
        frac = float(problem.evidence.get("coadapted_fraction", 0.0) or 0.0)
        return {"p": round(min(0.3, self.p + 0.2 * frac), 3), "mode": mode, "exact": True}

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        path = problem.site.module
        p = float(params.get("p", self.p))
        mode = params.get("mode") or self.propose(problem, target)["mode"]
        drop = nn.Dropout(p)
        name = target.insert_after(path, drop, mode, "gs_dropout")
        applied = Applied(exact=True, modules=[path] if mode == "fx" else [f"{path}.0"])
        applied.details.update({"inserted": name, "p": p, "changes": "training only (dropout "
                                "is the identity in eval mode)"})
        return applied
