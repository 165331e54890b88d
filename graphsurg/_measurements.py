"""What an IR adapter's ``observe`` returns and what ``graphsurg.detect`` judges.

Plain data over torch tensors; nothing here knows torch.fx or ONNX. Both adapters fill the
same fields with the same meaning, so one set of detectors judges both IRs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graphsurg.kernels import NeuronStats


@dataclass
class SiteMeasure:
    """One observed value (an activation's output, or a layer output no activation follows):
    its streamed statistics and a bounded row sample.

    Attributes:
        module: the producer layer whose output units are measured (torch: module path; ONNX:
            the producing node's name); the owning module when there is no producer.
        node: the observed graph node (torch) or value name (ONNX).
        op: canonical activation name (:mod:`graphsurg._activations`) or the layer kind
            (``"linear"``, ``"conv"``) for a bare layer output.
        family: ``"relu"`` | ``"saturating"`` | ``"smooth"`` | ``"linear"``.
        order: forward order among the sites.
        stats: the streamed statistics (units along ``channel_dim``).
        saturated_fraction: per unit, the fraction of values in the flat region (saturating
            family only).
        sample: up to ``DiagnoseConfig.rank_sample`` rows, units last (for effective rank).
        channel_dim: the unit axis the statistics were taken along.
        partner: for a gated unit (``act(gate(x)) * up(x)``, op ``"swiglu"``/``"geglu"``...),
            the up projection (``module`` is the gate projection); ``""`` otherwise.
        role: what the graph says the activation is for (both adapters read it off the graph;
            ``""`` when neither applies or the graph is unknown):
            ``"output"``: its values reach a graph output through no parametrised layer (a
            probability/output head: CREPE's pitch-bin sigmoid, a detector's score sigmoid);
            ``"gate"``: a sigmoid-family activation (bounds ``[0, high]``) whose output, through
            layout ops only, is used solely as a factor of products whose other factor does
            not derive from it (a squeeze-excite / GLU-style gate).
    """

    module: str
    node: str
    op: str
    family: str
    order: int
    stats: NeuronStats
    saturated_fraction: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    channel_dim: int = -1
    partner: str = ""
    role: str = ""


#: the values of :attr:`SiteMeasure.role`
ROLES: tuple[str, ...] = ("", "output", "gate")


@dataclass
class LayerMeasure:
    """One parametrised layer: shape, weight, gradient norm."""

    module: str
    kind: str
    order: int
    d_in: int
    d_out: int
    weight: torch.Tensor | None = None
    grad_sq: float | None = None  # mean over batches of the layer's squared gradient norm
    grad_nonfinite: bool = False
    next_modules: list[str] = field(default_factory=list)
    node: str = ""  # the weight's value name (ONNX) or the layer's graph node (torch)
    #: a parallel path (residual add, gate/excite multiply, concat, sibling branch) joins the
    #: layer's output with data that does not pass through it; None: not known (no graph)
    bypassed: bool | None = None


@dataclass
class Measurements:
    """Everything ``observe`` measured on a model.

    Attributes:
        sites / layers: in forward order.
        gradients: parameter gradients were measured (``loss_fn`` given, adapter can).
        input_nonfinite / output_nonfinite: non-finite values in the inputs / final outputs.
        losses: ``"train"``/``"val"`` mean losses when held-out data was given.
        ir: ``"torch"`` or ``"onnx"`` (sites carry it).
        batches: how many batches were observed.
        capture: how the model was captured (``"export"``, ``"symbolic_trace"``, ``"hooks"``,
            ``"onnxruntime"``).
        notes: anything the user should know (fallbacks, sites that could not be measured).
    """

    sites: list[SiteMeasure]
    layers: list[LayerMeasure]
    gradients: bool
    input_nonfinite: int = 0
    output_nonfinite: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    ir: str = "torch"
    batches: int = 0
    capture: str = ""
    notes: list[str] = field(default_factory=list)


__all__ = ["ROLES", "LayerMeasure", "Measurements", "SiteMeasure"]
