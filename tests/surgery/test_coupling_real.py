"""Coupling on the shapes real architectures have (issue 14), each on a tiny model built here:

- a layer shared by repeated blocks and called twice per forward (ALBERT): its coupling is
  proven on every call, and a reset of its dead units is exact on both calls;
- conv -> BatchNorm -> SiLU -> zero pad -> depthwise conv (no bias) -> BatchNorm (EfficientNet,
  MobileNet): the depthwise conv reads unit ``i`` alone, into its own output channel; a
  SiLU-dead unit is constant ~-1e-20 (not 0), so zeroing the depthwise kernel's slice is exact
  although the conv has no bias and the channel is zero-padded;
- a functional zero pad along the time axis (CREPE) passes the channels, a pad of the channel
  dim is refused; units L2-normalised into the output (Resemblyzer) are refused as outputs;
- a gated MLP ``down(silu(gate(x)) * up(x))`` (Llama): the gated unit is reported once, at the
  gate with the up projection as partner.

Function preservation is measured in float64 (both models converted) with a relative
tolerance of 1e-6: an exact edit changes float32 weights only where their contribution is 0
or ~1e-20, so what is left is float32 rounding of the re-run (~1e-7 relative).
"""

from __future__ import annotations

import copy

import torch
from _helpers import assert_treated, same_state, snapshot
from graphsurg.passes.fx.capture import capture, find_sites
from graphsurg.passes.fx.coupling import (
    CouplingGroup,
    _probe_delta,
    analyze_fx,
    probe_coupling,
    propagate_shapes,
    trace,
)
from torch import nn

import graphsurg as gs
from graphsurg.library import ReinitDead, Target

#: relative output change, float64, allowed for an exact edit (module doc)
TOL = 1e-6
DEAD_BIAS = -50.0


@torch.no_grad()
def _rel64(a: nn.Module, b: nn.Module, data: list[torch.Tensor]) -> float:
    """max over batches of ||f_a - f_b|| / ||f_b||, both models run in float64 (eval)."""
    a64, b64 = copy.deepcopy(a).double().eval(), copy.deepcopy(b).double().eval()
    return max(float((a64(x.double()) - b64(x.double())).norm() / b64(x.double()).norm())
               for x in data)


def _batches(shape: tuple[int, ...], n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _mse(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


# ---- a layer called twice (ALBERT's shared layer) ------------------------------------------


class _Shared(nn.Module):
    """One FFN block applied twice, with residuals and norms (ALBERT's layer sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 16)
        self.ffn, self.ffn_output = nn.Linear(16, 32), nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for _ in range(2):
            h = self.norm(h + self.ffn_output(nn.functional.gelu(self.ffn(h))))
        return self.head(h)


SHARED_UNITS = (3, 11, 20)


def _shared() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = _Shared().eval()
    with torch.no_grad():  # dead on both calls whatever the input: gelu(-50) = 0 in float32
        m.ffn.weight[list(SHARED_UNITS)] = 0.0
        m.ffn.bias[list(SHARED_UNITS)] = DEAD_BIAS
    return m, _batches((16, 6))


def test_shared_layer_coupling_is_proven_on_every_call() -> None:
    model, data = _shared()
    probed = probe_coupling(model, "ffn", lambda m: m(data[0]), units=SHARED_UNITS)
    gm, why = trace(model)
    assert gm is not None, why
    propagate_shapes(gm, (data[0],))
    traced = analyze_fx(gm, "ffn")
    for g in (probed, traced):
        assert g.ok, g.reason()
        assert [(c.module, c.start, c.stride) for c in g.consumers] == [("ffn_output", 0, 1)]
        assert not g.mixed


class _TwoConsumers(nn.Module):
    """A shared layer whose two calls feed different layers: no edit of its shared weights
    suits both, so the coupling is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.shared(self.a(torch.relu(self.shared(x))))))


def test_shared_layer_whose_calls_disagree_is_refused() -> None:
    torch.manual_seed(0)
    model, x = _TwoConsumers().eval(), _batches((8, 8), 1)[0]
    g = probe_coupling(model, "shared", lambda m: m(x), units=(2,))
    assert not g.ok
    assert "called 2 times" in g.reason() and "different consumers" in g.reason()


def test_shared_layer_reset_is_exact_on_both_calls() -> None:
    model, data = _shared()
    problem = gs.Problem("DeadNeurons", gs.Site("ffn", "gelu", "gelu"), 0.1, SHARED_UNITS,
                         evidence={"constant": list(SHARED_UNITS)})
    target = Target(copy.deepcopy(model), data)
    rep = ReinitDead()
    assert rep.check(problem, target) is None, rep.check(problem, target)
    applied = rep.apply_torch(target, problem, rep.propose(problem, target))
    assert applied.exact
    idx = list(SHARED_UNITS)
    assert bool((target.model.ffn_output.weight[:, idx] == 0).all())
    assert bool((target.model.ffn.weight[idx].norm(dim=1) > 0).all())
    assert _rel64(target.model, model, data) <= TOL


class _DeadOnOneCall(nn.Module):
    """A shared layer run on ``a`` and on ``-a`` (``a > 0``): a unit reading ``-a_j`` is
    ReLU-dead on the first call and live on the second."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.ffn, self.out = nn.Linear(6, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.stem(x)) + 1.0
        return self.head(self.out(torch.relu(self.ffn(a))) + self.out(torch.relu(self.ffn(-a))))


def test_shared_layer_units_dead_on_one_call_only_are_refused() -> None:
    torch.manual_seed(0)
    model, data = _DeadOnOneCall().eval(), _batches((16, 6))
    units = (4, 9)
    with torch.no_grad():  # -10 a_0 < 0 on the first call, 10 a_0 > 0 (varying) on the second
        model.ffn.weight[list(units)] = 0.0
        model.ffn.weight[list(units), 0] = -10.0
        model.ffn.bias[list(units)] = 0.0
    d = gs.diagnose(model, data, loss_fn=_mse)
    # the diagnosis measures each call's activation apart: the units are dead at one only
    at = {p.site.node: set(p.units) for p in d.problems
          if p.kind == "DeadNeurons" and p.site.module == "ffn"}
    assert [node for node, dead in at.items() if set(units) <= dead] == ["relu_1"], at
    assert not any(set(units) & dead for node, dead in at.items() if node != "relu_1"), at
    problem = gs.Problem("DeadNeurons", gs.Site("ffn", "relu_1", "relu"), 0.1, units,
                         evidence={"constant": list(units)})
    why = ReinitDead().check(problem, Target(copy.deepcopy(model), data))
    assert why is not None and "constant on some calls and vary on others" in why, why
    assert "units [4, 9]" in why


def test_operate_treats_a_shared_layer() -> None:
    model, data = _shared()
    state = snapshot(model)
    res = gs.operate(model, data, loss_fn=_mse)
    assert same_state(snapshot(model), state)
    assert_treated(res, "DeadNeurons", "ffn", SHARED_UNITS)
    assert _rel64(res.model, model, data) <= TOL


# ---- conv -> BN -> SiLU -> pad -> depthwise conv -> BN (EfficientNet) ----------------------


class _Inverted(nn.Module):
    """An inverted-residual block as transformers' EfficientNet writes it: the depthwise conv
    has no bias and its zero padding is a module of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)
        self.expand_bn, self.expand_act = nn.BatchNorm2d(24), nn.SiLU()
        self.pad = nn.ZeroPad2d(1)
        self.depthwise = nn.Conv2d(24, 24, 3, groups=24, bias=False)
        self.dw_bn, self.dw_act = nn.BatchNorm2d(24), nn.SiLU()
        self.project = nn.Conv2d(24, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand_act(self.expand_bn(self.expand(self.stem(x))))
        h = self.dw_act(self.dw_bn(self.depthwise(self.pad(h))))
        return self.head(self.project(h).mean((2, 3)))


DW_UNITS = (1, 7, 14, 20)


def _inverted() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = _Inverted()
    data = _batches((4, 3, 8, 8))
    m.train()
    with torch.no_grad():  # running statistics from the data, as a trained network has
        for x in data:
            m(x)
    m.eval()
    with torch.no_grad():  # dead through the norm (faults.plant_dead): SiLU(-50) ~ -1e-20
        m.expand.weight[list(DW_UNITS)] = 0.0
        m.expand_bn.weight[list(DW_UNITS)] = 0.0
        m.expand_bn.bias[list(DW_UNITS)] = DEAD_BIAS
    return m, data


def test_depthwise_conv_reads_each_unit_alone() -> None:
    model, data = _inverted()
    probed = probe_coupling(model, "expand", lambda m: m(data[0]), units=DW_UNITS)
    gm, why = trace(model)
    assert gm is not None, why
    propagate_shapes(gm, (data[0],))
    traced = analyze_fx(gm, "expand")
    for g in (probed, traced):
        assert g.ok, g.reason()
        assert [(c.module, c.groups, c.padded) for c in g.consumers] == [("depthwise", 24, True)]
        assert g.batchnorms() == ["expand_bn"]
        assert [op.kind for op in g.chain if op.kind == "pad"] == ["pad"]


def test_depthwise_consumer_reset_is_exact() -> None:
    model, data = _inverted()
    problem = gs.Problem("DeadNeurons", gs.Site("expand", "silu", "silu"), 0.1, DW_UNITS,
                         evidence={"constant": list(DW_UNITS)})
    target = Target(copy.deepcopy(model), data)
    rep = ReinitDead()
    assert rep.check(problem, target) is None, rep.check(problem, target)
    applied = rep.apply_torch(target, problem, rep.propose(problem, target))
    assert applied.exact, applied.details
    idx = list(DW_UNITS)
    assert bool((target.model.depthwise.weight[idx] == 0).all())  # each unit's own slice
    others = [u for u in range(24) if u not in DW_UNITS]
    assert torch.equal(target.model.depthwise.weight[others], model.depthwise.weight[others])
    assert _rel64(target.model, model, data) <= TOL


def test_operate_treats_dead_units_before_a_depthwise_conv() -> None:
    model, data = _inverted()
    state = snapshot(model)
    res = gs.operate(model, data, loss_fn=_mse)
    assert same_state(snapshot(model), state)
    assert_treated(res, "DeadNeurons", "expand", DW_UNITS)
    assert _rel64(res.model, model, data) <= TOL


class _Ripple(nn.Module):
    """expand -> BN -> SiLU -> depthwise -> BN of gain 1e5 -> SiLU -> pointwise: a push too
    small to wake a dead unit moves it by ~1e-10 at the depthwise conv (below the probe's
    tolerance), and the gain makes the ripple visible at the pointwise conv, in the unit's
    own column -- as if the pointwise conv read the unit and the depthwise conv did not."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 16, 1, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(16), nn.SiLU()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(16, eps=1e-12), nn.SiLU()
        self.pw = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.expand(x)))
        return self.pw(self.act2(self.bn2(self.dw(h)))).mean((2, 3))


def test_probe_wakes_a_dead_unit_before_reading_its_consumers() -> None:
    torch.manual_seed(0)
    m, x = _Ripple().eval(), _batches((4, 3, 6, 6), 1)[0]
    units = [3, 9]
    with torch.no_grad():
        m.expand.weight[units] = 0.0  # dead through the norm, as faults.plant_dead does
        m.bn1.weight[units] = 0.0
        m.bn1.bias[units] = DEAD_BIAS
        delta = _probe_delta(m.expand(x), 1, units[0])  # the probe's first push
        m.bn1.running_var.fill_((delta / 25) ** 2 - m.bn1.eps)  # the push lands at -50 + 25
        m.bn2.running_var.fill_(1e-10)
    g = probe_coupling(m, "expand", lambda mm: mm(x), units=units)
    assert g.ok, g.reason()
    assert [(c.module, c.groups) for c in g.consumers] == [("dw", 16)]


# ---- a gated MLP is one site ---------------------------------------------------------------


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(16, 24), nn.Linear(16, 24)
        self.down_proj = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mlp, self.head = nn.Linear(8, 16), _MLP(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(h + self.mlp(h))


GATED_UNITS = (2, 9, 17)


def _gated() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = _Decoder().eval()
    with torch.no_grad():  # a zero gate row: silu(0) = 0, the gated unit is 0 (faults.py)
        m.mlp.gate_proj.weight[list(GATED_UNITS)] = 0.0
        m.mlp.gate_proj.bias[list(GATED_UNITS)] = 0.0
    return m, _batches((16, 8))


def test_gated_product_is_one_site() -> None:
    model, data = _gated()
    cap = capture(copy.deepcopy(model), (data[0],), {})
    assert cap.gm is not None, cap.notes
    _, acts = find_sites(cap.gm)
    products = [s for s in acts if s.partner]
    assert [(s.producer, s.partner) for s in products] == [("mlp.gate_proj", "mlp.up_proj")]
    assert not [s for s in acts if s.node == products[0].node and s is not products[0]]


def test_gated_dead_units_are_reported_once() -> None:
    model, data = _gated()
    d = gs.diagnose(model, data, loss_fn=_mse)
    dead = [p for p in d.problems if p.kind == "DeadNeurons"]
    assert [(p.site.module, tuple(p.units), p.evidence.get("partner")) for p in dead] == [
        ("mlp.gate_proj", GATED_UNITS, "mlp.up_proj")]



def test_operate_treats_the_gated_unit_once() -> None:
    model, data = _gated()
    res = gs.operate(model, data, loss_fn=_mse)
    assert_treated(res, "DeadNeurons", "mlp.gate_proj", GATED_UNITS)
    assert len(res.plan.schemas) == 1, res.summary()
    assert _rel64(res.model, model, data) <= TOL


# ---- a functional pad along the time axis (CREPE) ------------------------------------------
class _TimePad(nn.Module):
    """conv (along time) -> ReLU -> BatchNorm -> ``F.pad`` of the time axis -> conv -> mean ->
    Linear, as CREPE's blocks (``pad`` is the pad list; ``mode`` its mode)."""

    def __init__(self, pad: tuple[int, ...] = (0, 0, 1, 2), mode: str = "constant") -> None:
        super().__init__()
        self.pad, self.mode = pad, mode
        self.conv1 = nn.Conv2d(1, 12, (5, 1))
        self.bn = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12 + sum(pad[4:6]), 6, (4, 1))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(torch.relu(self.conv1(x)))
        h = torch.nn.functional.pad(h, self.pad, mode=self.mode)
        return self.head(self.conv2(h).mean((2, 3)))


PAD_UNITS = (0, 5, 11)


def _time_pad(**kw: object) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = _TimePad(**kw)  # type: ignore[arg-type]
    data = _batches((8, 1, 24, 1))
    m.train()
    with torch.no_grad():
        for x in data:
            m(x)
        m.bn.bias.add_(0.5)  # the dead units' constant after the norm is not 0
    m.eval()
    with torch.no_grad():
        m.conv1.weight[list(PAD_UNITS)] = 0.0
        m.conv1.bias[list(PAD_UNITS)] = -1.0
    return m, data


def _fx_group(model: nn.Module, x: torch.Tensor, producer: str = "conv1") -> CouplingGroup:
    gm, why = trace(model)
    assert gm is not None, why
    propagate_shapes(gm, (x,))
    return analyze_fx(gm, producer)


def test_functional_pad_of_the_time_axis_passes_the_channels() -> None:
    """A zero pad of the non-channel dims is channel-local: conv2 consumes the units, and it
    reads them zero-padded (a constant unit is not constant at the border)."""
    model, data = _time_pad()
    g = _fx_group(model, data[0])
    assert g.ok, g.reason()
    assert [(c.module, c.padded) for c in g.consumers] == [("conv2", True)]
    assert [op.kind for op in g.chain] == ["activation", "batchnorm", "pad"]


def test_functional_reflect_pad_does_not_pad_the_units() -> None:
    """A reflection pad repeats the units' own values: followed, but not a zero border."""
    model, data = _time_pad(mode="reflect")
    g = _fx_group(model, data[0])
    assert g.ok, g.reason()
    assert [(c.module, c.padded) for c in g.consumers] == [("conv2", False)]


def test_functional_pad_of_the_channel_dim_is_refused() -> None:
    model, data = _time_pad(pad=(0, 0, 1, 2, 1, 1))
    g = _fx_group(model, data[0])
    assert not g.ok
    assert "pads the unit dim 1 by (1, 1)" in g.reason()


def test_operate_treats_dead_units_before_a_time_pad() -> None:
    """The units are constant (non-zero) after the norm and zero-padded before conv2: no
    exact excision exists; operate treats them (a reinit) and leaves the input untouched."""
    model, data = _time_pad()
    state = snapshot(model)
    res = gs.operate(model, data)
    assert same_state(snapshot(model), state)
    assert_treated(res, "DeadNeurons", "conv1", PAD_UNITS)


# ---- units L2-normalised into the output (Resemblyzer's speaker embedding) -----------------
class _Embed(nn.Module):
    """Linear -> ReLU -> ``e / ||e||`` (the embedding is the output) or, with ``head``,
    ``F.normalize`` then a Linear reading the normalised units."""

    def __init__(self, head: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.relu(self.linear(x))
        if self.head is not None:
            return self.head(torch.nn.functional.normalize(e, dim=1))
        return e / e.norm(dim=1, keepdim=True)


EMBED_DEAD = (3, 9)


def _embed(head: bool = False) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    m = _Embed(head).eval()
    with torch.no_grad():
        m.linear.weight[list(EMBED_DEAD)] = 0.0
        m.linear.bias[list(EMBED_DEAD)] = -5.0
    return m, _batches((32, 6))


def test_l2_normalised_output_units_are_refused_as_outputs() -> None:
    model, data = _embed()
    g = _fx_group(model, data[0], "linear")
    assert not g.ok
    assert g.refusals == ["the units of 'linear' are model outputs (through an L2 "
                          "normalisation at 'truediv'): no surgery keeps the function (a reset "
                          "changes the output, an excision its width)"]


def test_l2_normalisation_before_a_layer_is_refused_as_mixing() -> None:
    model, data = _embed(head=True)
    g = _fx_group(model, data[0], "linear")
    assert not g.ok
    assert g.refusals == ["L2 normalisation at 'normalize' divides the units of 'linear' by "
                          "their norm (changing one unit changes them all)"]


def test_operate_refuses_dead_output_units_naming_the_cause() -> None:
    model, data = _embed()
    state = snapshot(model)
    try:
        gs.operate(model, data)
    except gs.SurgeryFailed as e:
        assert "are model outputs (through an L2 normalisation at 'truediv')" in str(e)
    else:
        raise AssertionError("operate claimed a treatment of L2-normalised output units")
    finally:
        assert same_state(snapshot(model), state)
