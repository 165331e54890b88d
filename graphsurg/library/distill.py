"""Distill (module scale): replace a failing module by a fresh library module fitted to it.

"Profile replacement" by local knowledge distillation. The failing module (a layer with its
channel-local chain, e.g. ``relu(linear(x))``, or a named module such as a Hugging Face MLP
block) is run on the calibration data and its input -> output pairs are recorded; a fresh
module of the same interface is fitted to them for a few hundred Adam steps and pasted in its
place. The architecture is chosen from the site's interface:

==========================================  ===================================================
old module                                  new module
==========================================  ===================================================
rooted at a Linear (``(..., d_in)``)        MLP block ``Linear -> GELU -> Linear`` (+ linear skip)
rooted at a Conv1d/2d/3d                    conv block ``Conv (same geometry) -> GELU -> 1x1 Conv``
a sequence block ``(N, T, d) -> (N, T, d)``  pre-norm transformer block (``nn.TransformerEncoderLayer``)
==========================================  ===================================================

Not exact: the certificates bound the output change and the loss, and ``Applied.details``
reports the distillation error ``||g(x) - f(x)|| / ||f(x)||`` on held-out recorded inputs
(a fifth of the recorded rows, never used for fitting). The fresh module's units are alive
(it is freshly initialised), which is why it treats a block whose units keep dying after a
neuron-scale reset. Refused when the module's input or output is not a single floating
tensor, or when the fit is worse than ``max_error`` on held-out inputs.

The planner does not pick it as a first choice: it is reached by escalation (a neuron- or
layer-scale schema failed at the site) or when a plan asks for it (``prefer=["distill"]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from .._problems import Problem
from ..passes.fx.rewrite import RewriteError, block_bounds, extract_block, unique_name
from ._base import Applied, Refused, Replacement, Target

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class MLPBlock(nn.Module):
    """``y = W2 gelu(W1 z) + S z`` along the last dimension, ``z = (x - shift) / scale``.

    ``shift`` and ``scale`` are buffers set from the recorded inputs (per feature), so the
    fresh hidden units are centred on the data and fire on part of it whatever the inputs'
    offset (an input far from 0 would otherwise put every fresh unit on one side of its
    kink: dormant again). ``S`` is a linear skip.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(d_in))
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_out)
        self.skip = nn.Linear(d_in, d_out)

    @torch.no_grad()
    def standardise(self, x: torch.Tensor) -> None:
        """Set ``shift``/``scale`` to the mean and spread of ``x``'s last dimension."""
        rows = x.reshape(-1, x.shape[-1])
        self.shift.copy_(rows.mean(0))
        self.scale.copy_(rows.std(0).clamp_min(1e-6) if rows.shape[0] > 1 else
                         torch.ones_like(self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.shift) / self.scale
        return self.fc2(self.act(self.fc1(z))) + self.skip(z)


class ConvBlock(nn.Module):
    """``y = C2 gelu(C1 x) + S x``: ``C1`` has the old conv's geometry, ``C2`` is 1x1 and ``S``
    a bias-free conv with the old geometry (so the output shape is the old one)."""

    def __init__(self, conv: nn.Module, hidden: int) -> None:
        super().__init__()
        cls: Any = type(conv)
        c: Any = conv
        geo = {"kernel_size": c.kernel_size, "stride": c.stride, "padding": c.padding,
               "dilation": c.dilation, "padding_mode": c.padding_mode}
        self.conv1 = cls(c.in_channels, hidden, **geo)
        self.act = nn.GELU()
        self.conv2 = cls(hidden, c.out_channels, 1)
        self.skip = cls(c.in_channels, c.out_channels, bias=False, **geo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x))) + self.skip(x)


def _heads(d: int) -> int:
    for h in (4, 2, 1):
        if d % h == 0 and d // h >= 4:
            return h
    return 1


def build_replacement(old: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                      hidden: int | None = None, root: nn.Module | None = None
                      ) -> tuple[nn.Module, str]:
    """The fresh library module for ``old`` (``x -> y`` recorded), and its architecture name.

    ``root`` is the layer the old module is built around (its first Linear/Conv) when known.
    """
    root = root if root is not None else _root_layer(old)
    if isinstance(root, _CONV) and x.dim() == y.dim() and x.dim() >= 3:
        h = hidden or 2 * max(int(root.in_channels), int(root.out_channels))
        return ConvBlock(root, h), "conv_block"
    if x.dim() == 3 and y.shape == x.shape and _mixes_tokens(old):
        d = int(x.shape[-1])
        layer = nn.TransformerEncoderLayer(d, _heads(d), dim_feedforward=hidden or 4 * d,
                                           dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        return layer, "transformer_block"
    if x.shape[:-1] == y.shape[:-1]:
        d_in, d_out = int(x.shape[-1]), int(y.shape[-1])
        h = hidden or 2 * max(d_in, d_out)
        return MLPBlock(d_in, h, d_out), "mlp_block"
    raise Refused(f"no library module has the interface {list(x.shape)} -> {list(y.shape)}")


def _root_layer(m: nn.Module) -> nn.Module | None:
    if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return m
    for sub in m.modules():
        if isinstance(sub, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return sub
    return None


def _mixes_tokens(m: nn.Module) -> bool:
    return any(isinstance(s, nn.MultiheadAttention) or "attention" in type(s).__name__.lower()
               for s in m.modules())


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _augment(x: torch.Tensor, n: int, gen: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """``n`` inputs near the recorded ones: mixup of two recorded samples plus Gaussian noise
    at ``noise`` x the per-feature spread (the teacher labels them)."""
    if n <= 0 or x.shape[0] < 2:
        return x[:0]
    m = int(x.shape[0])
    i = torch.randint(0, m, (n,), generator=gen)
    j = torch.randint(0, m, (n,), generator=gen)
    lam = torch.rand((n,) + (1,) * (x.dim() - 1), generator=gen).to(x.dtype)
    out = lam * x[i] + (1 - lam) * x[j]
    std = x.std(0, keepdim=True)
    return out + noise * std * torch.randn(out.shape, generator=gen).to(x.dtype)


@torch.no_grad()
def _closed_form(block: MLPBlock, x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> None:
    """Least squares for the output layer and skip of an :class:`MLPBlock` on its random GELU
    features (fc1 stays as drawn): a good start that Adam then refines."""
    x = (x - block.shift) / block.scale
    phi = torch.cat([block.act(block.fc1(x)), x, torch.ones_like(x[:, :1])], 1).double()
    a = phi.T @ phi
    a += ridge * a.diagonal().mean().clamp_min(1e-12) * torch.eye(a.shape[0], dtype=a.dtype)
    sol = torch.linalg.solve(a, phi.T @ y.double()).to(x.dtype)
    h, d = block.fc1.out_features, x.shape[1]
    block.fc2.weight.copy_(sol[:h].T)
    block.skip.weight.copy_(sol[h:h + d].T)
    block.fc2.bias.copy_(sol[-1])
    assert block.skip.bias is not None
    block.skip.bias.zero_()


def fit(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float,
        gen: torch.Generator, holdout: float = 0.2, batch: int = 256, augment: int = 0,
        teacher: Any = None, rows: Any = None) -> dict[str, Any]:
    """Fit ``module`` to ``x -> y`` on all but a held-out ``holdout`` fraction of the recorded
    samples, and return the relative errors on both parts.

    With ``teacher`` (the old module), extra inputs near the training samples (``augment``
    fitting rows' worth) are labelled by it (see :func:`_augment`); held-out samples are never used. ``rows`` maps
    samples to fitting rows (an MLP block fits every position). An :class:`MLPBlock` starts
    from a least-squares solution; then Adam (cosine-decayed ``lr``) on minibatches.
    """
    rows = rows or (lambda t: t)
    n = int(x.shape[0])
    perm = torch.randperm(n, generator=gen)
    k = max(1, int(round(holdout * n))) if n > 1 else 0
    held, train = perm[:k], perm[k:]
    if train.numel() == 0:
        train = held
    xs, ys = x[train], y[train]
    if teacher is not None and augment > 0:
        per = max(1, int(rows(xs[:1]).shape[0]))  # fitting rows per sample
        xa = _augment(xs, max(1, augment // per), gen)
        with torch.no_grad():
            ya = teacher(xa)
        xs, ys = torch.cat([xs, xa]), torch.cat([ys, ya])
    xt, yt = rows(xs), rows(ys)
    if isinstance(module, MLPBlock):
        module.standardise(xt)
        _closed_form(module, xt, yt)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps))))
    scale = yt.pow(2).mean().clamp_min(1e-12)
    module.train()
    with torch.enable_grad():
        for _ in range(steps):
            if xt.shape[0] > batch:
                idx = torch.randint(0, int(xt.shape[0]), (batch,), generator=gen)
                xb, yb = xt[idx], yt[idx]
            else:
                xb, yb = xt, yt
            opt.zero_grad(set_to_none=True)
            loss = (module(xb) - yb).pow(2).mean() / scale
            loss.backward()
            opt.step()
            sched.step()
    module.eval()

    @torch.no_grad()
    def err(xx: torch.Tensor, yy: torch.Tensor) -> float:
        if xx.shape[0] == 0:
            return float("nan")
        ref = yy.double()
        return float((module(xx).double() - ref).norm() / ref.norm().clamp_min(1e-30))

    return {"train_error": err(x[train], y[train]), "heldout_error": err(x[held], y[held]),
            "train_samples": int(train.numel()), "heldout_samples": int(held.numel()),
            "augmented": int(xs.shape[0] - train.numel())}


class Distill(Replacement):
    """Replace a failing module by a fresh library module fitted to its recorded outputs."""

    name = "distill"
    treats = ("DeadNeurons", "Saturation", "Bottleneck", "VanishingGradient", "MixingCollapse")
    scales = ("module",)
    guarantee = "bounded"
    priority = 90
    escalation_only = True  # planned by escalation or on request

    def __init__(self, *, steps: int = 200, lr: float = 1e-3, max_error: float = 0.5,
                 batches: int = 4, augment: int = 2048) -> None:
        """``steps``/``lr``: Adam on the fit; ``max_error``: refuse above this held-out
        error; ``batches``: calibration batches recorded; ``augment``: fitting rows of
        teacher-labelled inputs near the recorded ones."""
        self.steps = steps
        self.augment = augment
        self.lr = lr
        self.max_error = max_error
        self.batches = batches

    # -- where ------------------------------------------------------------------------------
    def _locate(self, target: Target, problem: Problem, params: dict[str, Any]
                ) -> tuple[str, str]:
        """``(mode, path)``: ``("block", layer)`` for an FX block around a layer, or
        ``("module", path)`` for a named module replaced whole."""
        if params.get("module"):
            return "module", str(params["module"])
        path = problem.site.module
        try:
            target.model.get_submodule(path)
        except AttributeError:
            raise Refused(f"the model has no module {path!r} (the site is gone)") from None
        gm, _ = target.graph_module()
        if gm is not None:
            try:
                block_bounds(gm, path)
                return "block", path
            except RewriteError:
                pass
        return "module", self._climb(target, path)

    @staticmethod
    def _climb(target: Target, path: str) -> str:
        """The largest enclosing module that reads the same input as ``path`` (e.g. a
        Hugging Face ``BertIntermediate`` around its ``dense``), so the activation after the
        layer is replaced with it."""
        try:
            x = target.capture(path, batches=1)
        except Refused:
            return path
        best = path
        parts = path.split(".")
        for i in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:i])
            try:
                px = target.capture(parent, batches=1)
                po = target.capture(parent, output=True, batches=1)
            except (Refused, TypeError, AttributeError, IndexError, RuntimeError):
                break
            if px.shape != x.shape or not torch.equal(px, x) or not po.is_floating_point():
                break
            best = parent
        return best

    def check(self, problem: Problem, target: Target) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        try:
            mode, path = self._locate(target, problem, {})
            if mode == "module":
                target.model.get_submodule(path)
        except Refused as e:
            return str(e)
        except AttributeError:
            return f"the model has no module {problem.site.module!r}"
        return None

    def propose(self, problem: Problem, target: Target, *, exact: bool = False
                ) -> dict[str, Any]:
        mode, path = self._locate(target, problem, {})
        return {"mode": mode, "module": path if mode == "module" else "", "layer":
                path if mode == "block" else "", "steps": self.steps, "exact": False}

    # -- recording ---------------------------------------------------------------------------
    def _record(self, target: Target, mode: str, path: str
                ) -> tuple[torch.Tensor, torch.Tensor, nn.Module, nn.Module | None,
                           tuple[fx.Node, fx.Node] | None]:
        n = max(1, min(self.batches, len(target.batches)))
        if mode == "block":
            gm, reason = target.graph_module()
            if gm is None:
                raise Refused(f"distill of a layer block needs a torch.fx graph: {reason}")
            try:
                xn, end = block_bounds(gm, path)
                sub = extract_block(gm, xn, end).eval()
            except RewriteError as e:
                raise Refused(str(e)) from None
            x = target.capture(path, batches=n)
            with torch.no_grad():
                y = sub(x)
            return x, y, sub, gm.get_submodule(path), (xn, end)
        try:
            old = target.model.get_submodule(path)
        except AttributeError:
            raise Refused(f"the model has no module {path!r}") from None
        x = target.capture(path, batches=n)
        y = target.capture(path, output=True, batches=n)
        if not (isinstance(y, torch.Tensor) and x.is_floating_point() and y.is_floating_point()):
            raise Refused(f"{path!r} does not map a floating tensor to a floating tensor")
        return x, y, old, None, None

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        mode = str(params.get("mode") or "")
        path = str(params.get("layer") or params.get("module") or "")
        if not mode or not path:
            mode, path = self._locate(target, problem, params)
        x, y, sub_or_old, root, bounds = self._record(target, mode, path)
        old = sub_or_old
        gen = target.generator(f"distill:{path}")
        with torch.random.fork_rng(devices=[]):  # default inits, seeded from the target
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            new, arch = build_replacement(old, x, y, hidden=params.get("hidden"), root=root)
        dev = x.device
        new = new.to(device=dev, dtype=x.dtype)
        steps = int(params.get("steps", self.steps))
        teacher = sub_or_old
        lr = float(params.get("lr") or (self.lr if arch == "mlp_block" else 3 * self.lr))
        err = fit(new, x, y, steps=steps, lr=lr, gen=gen,
                  augment=int(params.get("augment", self.augment if arch == "mlp_block"
                                         else self.augment // 8)), teacher=teacher,
                  rows=_flat_rows if arch == "mlp_block" else None)
        max_error = float(params.get("max_error", self.max_error))
        if not err["heldout_error"] <= max_error:
            raise Refused(f"distillation of {path!r} into a {arch} reached a held-out error of "
                          f"{err['heldout_error']:.3g} > {max_error}")
        for p in new.parameters():
            p.requires_grad_(True)
        n_old = sum(p.numel() for p in old.parameters())
        if mode == "block":
            gm, _ = target.graph_module()
            assert gm is not None and bounds is not None
            name = unique_name(gm, f"gs_distill_{path}")
            gm.add_submodule(name, new)
            xn, end = bounds
            with gm.graph.inserting_after(end):
                node = gm.graph.call_module(name, (xn,))
            for key in ("tensor_meta", "val"):
                if key in end.meta:
                    node.meta[key] = end.meta[key]
            end.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
            gm.delete_all_unused_submodules()
            new.train(target.model.training)
            target.set_model(gm)
        else:
            name = path
            target.replace_module(path, new)
        applied = Applied(exact=False, modules=[name],
                          new_parameters=[f"{name}.{n}" for n, _ in new.named_parameters()])
        applied.details.update({
            "architecture": arch, "replaced": path, "mode": mode, "new_module": name,
            "distill_steps": steps, "distill_error_train": err["train_error"],
            "distill_error_heldout": err["heldout_error"], "heldout_samples": err["heldout_samples"],
            "train_samples": err["train_samples"], "augmented": err["augmented"], "params_before": n_old,
            "params_after": sum(p.numel() for p in new.parameters())})
        return applied
