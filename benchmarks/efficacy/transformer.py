"""Experiment 5 -- dying ReLU units in a real architecture: a Hugging Face BERT encoder.

A 2-layer ``transformers.BertModel`` (hidden 64, 4 heads, ReLU feed-forward of 256 units,
random weights from its config, nothing downloaded) with a linear head on the mean-pooled
last hidden state is trained on a teacher regression task: token sequences labelled by a
fixed random *teacher* BERT of the same shape (GELU, ``initializer_range=0.1``: large enough
that its output depends non-linearly on the tokens; a student with an 8-unit feed-forward
ends about 2x higher than one with 256). Adam at a large learning rate (1e-2) leaves a third
to a half of the feed-forward units dormant (ReDo score <= 0.1 over tokens); training then
continues at lr 1e-3 in four arms:

* **untreated**: plain training;
* **ReDo**: every ``K`` steps, the dormant units of each feed-forward block (scored on the
  current batch, every token a sample) get their ``intermediate.dense`` rows re-drawn from
  the model's own initialiser (``normal(0, initializer_range)``, bias 0), their
  ``output.dense`` columns zeroed and the Adam moments of both reset -- implemented from the
  paper as experiment 1's, adapted to the transformer's Linear pair;
* **graphsurg operate**: ``gs.operate`` once with default certificates, the planner's
  choice, its healing steps counted in the budget; the optimizer is rebuilt on the new model;
* **graphsurg callback**: ReDo's schedule with graphsurg's diagnosis: the model trains
  through ``torch.compile(backend="graphsurg")`` with a ``gs.Monitor`` and
  ``gs.SurgeryCallback`` operates in place every ``K`` steps, keeping the optimizer.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import graphsurg as gs

from .common import (
    Batch,
    dormant_fraction,
    eval_loss,
    fmt,
    mse,
    plot_xy,
    table,
    train,
    train_checkpointed,
)

ARMS = ("untreated", "ReDo", "graphsurg operate", "graphsurg callback")
VOCAB = 64
OUT = 4


def _transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def config(hidden: int, ffn: int, seq: int, act: str = "relu", init: float = 0.02) -> Any:
    """A 2-layer BERT config (dropout off, eager attention: the same graph every call)."""
    return _transformers().BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=ffn, hidden_act=act, max_position_embeddings=seq,
        initializer_range=init, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager")


class BertRegressor(nn.Module):
    """``transformers.BertModel`` (no pooler) + a linear head on the mean-pooled tokens."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.bert = _transformers().BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(cfg.hidden_size, OUT)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids).last_hidden_state
        return self.head(h).mean(1)  # type: ignore[no-any-return]


def build(seed: int, hidden: int, ffn: int, seq: int) -> BertRegressor:
    torch.manual_seed(seed)
    return BertRegressor(config(hidden, ffn, seq))


@torch.no_grad()
def teacher_batches(seed: int, n: int, batch: int, hidden: int, seq: int) -> list[Batch]:
    """``n`` batches of (token ids, standardised targets of a random GELU teacher BERT)."""
    torch.manual_seed(10_000 + seed)
    teacher = BertRegressor(config(hidden, 4 * hidden, seq, act="gelu", init=0.1)).eval()
    g = torch.Generator().manual_seed(20_000 + seed)
    xs = [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]
    ys = [teacher(x) for x in xs]
    y = torch.cat(ys)
    mu, sd = y.mean(0), y.std(0)
    return [(x, (t - mu) / sd) for x, t in zip(xs, ys, strict=True)]


def ffn_blocks(model: nn.Module) -> list[tuple[nn.Linear, nn.Module, nn.Linear]]:
    """(``intermediate.dense``, its activation module, ``output.dense``) of every layer."""
    out = []
    for layer in model.bert.encoder.layer:  # type: ignore[union-attr]
        out.append((layer.intermediate.dense, layer.intermediate.intermediate_act_fn,
                    layer.output.dense))
    return out


class ReDo:
    """ReDo (Sokar et al. 2023, Alg. 1) for the feed-forward blocks of a BERT encoder: the
    units are the ``intermediate.dense`` outputs, every token of the batch a sample."""

    def __init__(self, model: BertRegressor, tau: float = 0.1, every: int = 50) -> None:
        self.model, self.tau, self.every = model, tau, every
        self.init_std = float(model.bert.config.initializer_range)
        self.batch: torch.Tensor | None = None
        self.resets = 0

    @torch.no_grad()
    def __call__(self, step: int, opt: torch.optim.Optimizer) -> None:
        if (step + 1) % self.every or self.batch is None:
            return
        blocks = ffn_blocks(self.model)
        acts: list[torch.Tensor] = []
        hooks = [act.register_forward_hook(lambda _m, _i, o: acts.append(o.detach()))
                 for _inc, act, _out in blocks]
        try:  # one forward pass scores every layer (Alg. 1)
            self.model(self.batch)
        finally:
            for hook in hooks:
                hook.remove()
        for (inc, _act, out), h in zip(blocks, acts, strict=True):
            score = h.abs().flatten(0, -2).mean(0)
            score = score / score.mean().clamp_min(1e-12)
            idx = (score <= self.tau).nonzero().flatten()
            if idx.numel() == 0:
                continue
            # the model's own initialiser (PreTrainedModel._init_weights): N(0, init_std)
            inc.weight[idx] = torch.randn(idx.numel(), inc.in_features) * self.init_std
            inc.bias[idx] = 0.0
            out.weight[:, idx] = 0.0
            for p, dim in ((inc.weight, 0), (inc.bias, 0), (out.weight, 1)):
                st = opt.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st:
                        st[key].index_fill_(dim, idx, 0.0)
            self.resets += int(idx.numel())


def _acts(model: nn.Module) -> str:
    return ", ".join(type(a).__name__ for _i, a, _o in ffn_blocks(model))


def run(seeds: list[int], quick: bool, out: Path, *, arms: tuple[str, ...] | None = None,
        n_calib: int | None = None) -> dict[str, Any]:
    """The experiment (``--quick``: a tiny model, a few steps, no callback arm: compiling
    the model through Dynamo alone takes ~30 s). ``arms`` and ``n_calib`` (the number of
    training batches given to ``gs.operate``) are there for ablations."""
    t0 = time.perf_counter()
    if arms is None:
        arms = ARMS[:3] if quick else ARMS
    hidden, ffn, seq, bs = (32, 64, 8, 32) if quick else (64, 256, 16, 64)
    n_train = 8 if quick else 48
    if n_calib is None:  # batches given to gs.operate (diagnosis + healing)
        n_calib = 8 if quick else 16
    break_steps = 60 if quick else 300
    steps = 40 if quick else 600
    check = 20 if quick else 50
    heal = 20 if quick else 100
    metrics: dict[str, dict[str, list[float]]] = {a: {} for a in arms}
    curves: dict[str, list[list[float]]] = {a: [] for a in arms}
    dcurves: dict[str, list[list[float]]] = {a: [] for a in arms}
    notes: list[str] = []
    broken_frac: list[float] = []
    broken_loss: list[float] = []
    for seed in seeds:
        batches = teacher_batches(seed, n_train + 4, bs, hidden, seq)
        tr, held = batches[:n_train], batches[n_train:]
        xh = torch.cat([b[0] for b in held])
        model = build(seed, hidden, ffn, seq)
        torch.manual_seed(seed)
        train(model, tr, break_steps, lr=1e-2)
        d0 = dormant_fraction(model, xh)
        l0 = eval_loss(model, held)
        broken_frac.append(d0)
        broken_loss.append(l0)
        for arm in arms:
            torch.manual_seed(seed + 1)
            m: nn.Module = copy.deepcopy(model)
            done = 0
            ls, ds = [l0], [d0]
            every: Any = None
            res: Any = None
            t_arm = time.perf_counter()
            if arm == "ReDo":
                assert isinstance(m, BertRegressor)
                every = ReDo(m, tau=0.1, every=check)
            elif arm == "graphsurg operate":
                try:  # the default certificates (issue 13)
                    res = gs.operate(m, tr[:n_calib], loss_fn=mse, heal_steps=heal, seed=seed)
                except gs.SurgeryFailed as e:
                    notes.append(f"{arm} (seed {seed}): no surgery ({e})")
                    res = None
            if res is not None:
                m = res.model
                done = int(res.healing.get("steps") or 0)
                kept = [f"{v.replacement}@{v.site}" for v in res.verification if v.kept]
                notes.append(f"{arm} (seed {seed}): kept {', '.join(kept) or 'nothing'}; "
                             f"{done} healing step(s); rolled back "
                             f"{[r['replacement'] for r in res.rolled_back]}; "
                             f"activations after: {_acts(m)}; "
                             f"{time.perf_counter() - t_arm:.0f} s")
                metrics[arm].setdefault("schemas kept", []).append(len(kept))
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            fwd: Any = None
            cb: Any = None
            if arm == "graphsurg callback":
                torch._dynamo.reset()
                mon = gs.Monitor(every=2)
                options: dict[str, Any] = {"monitor": mon, "inner": "aot_eager"}
                compiled = torch.compile(m, backend="graphsurg", options=options)

                def fwd(x: torch.Tensor, _c: Any = compiled) -> torch.Tensor:
                    # common.train's `forward or model` would call len() on the compiled
                    # module, which only an nn.Sequential supports
                    return _c(x)  # type: ignore[no-any-return]

                cb = gs.SurgeryCallback(m, opt, mon, every=check, seed=seed)
            train_checkpointed(m, tr, held, xh, ls, ds, steps=steps, check=check, done=done,
                               opt=opt, every=every, forward=fwd,
                               after=None if cb is None else cb.step)
            if isinstance(every, ReDo):
                metrics[arm].setdefault("units reset", []).append(every.resets)
            if cb is not None:
                applied = [a for e in cb.history for a in e.applied]
                metrics[arm].setdefault("schemas kept", []).append(len(applied))
                notes.append(f"{arm} (seed {seed}): {len(applied)} in-place edit(s) in "
                             f"{len(cb.history)} rounds: {sorted(set(applied))}; rolled back "
                             f"{sum(len(e.rolled_back) for e in cb.history)}; reported "
                             f"{sorted({r for e in cb.history for r in e.reported})}; "
                             f"{time.perf_counter() - t_arm:.0f} s")
                torch._dynamo.reset()
            curves[arm].append(ls)
            dcurves[arm].append(ds)
            metrics[arm].setdefault("final loss", []).append(ls[-1])
            metrics[arm].setdefault("dormant", []).append(ds[-1])
    xs = [i * check for i in range(steps // check + 1)]
    plot_xy(out / "transformer_loss.png", {a: (xs, curves[a]) for a in arms},
            title="BERT (ReLU FFN): held-out loss after the large-lr phase",
            xlabel="step (lr 1e-3)", ylabel="held-out MSE")
    plot_xy(out / "transformer_dormant.png", {a: (xs, dcurves[a]) for a in arms},
            title="BERT (ReLU FFN): dormant fraction (ReDo score <= 0.1)",
            xlabel="step (lr 1e-3)", ylabel="dormant fraction", logy=False)
    rows = [[a, fmt(metrics[a]["dormant"]), fmt(metrics[a]["final loss"])] for a in arms]
    return {
        "name": "transformer",
        "title": "5. Dying ReLU in a transformer: BERT encoder, ReDo vs graphsurg",
        "setup": (f"transformers.BertModel, 2 layers, hidden {hidden}, 4 heads, ReLU "
                  f"feed-forward {ffn}, random init, + a linear head on the mean-pooled "
                  f"tokens; a teacher regression on sequences of {seq} tokens (vocabulary "
                  f"{VOCAB}, {n_train} training batches of {bs}, targets of a random GELU "
                  f"BERT teacher, initializer_range 0.1). Adam lr 1e-2 for {break_steps} "
                  f"steps leaves {fmt(broken_frac)} of the feed-forward units dormant "
                  f"(held-out MSE {fmt(broken_loss)}); then {steps} steps at lr 1e-3 "
                  f"(graphsurg's healing steps included; `gs.operate` gets the first "
                  f"{n_calib} training batches). ReDo: tau=0.1 every {check} steps, fresh "
                  f"rows from N(0, 0.02), Adam moment reset."),
        "table": table(["arm", f"dormant fraction after {steps} steps", "held-out MSE"],
                       rows),
        "metrics": metrics,
        "broken_dormant": broken_frac,
        "plots": ["transformer_loss.png", "transformer_dormant.png"],
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }
