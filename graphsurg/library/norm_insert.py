"""NormInsert (layer scale): a BatchNorm inserted after a layer as the identity.

The inserted :class:`ChannelBatchNorm` normalises the layer's output units (whatever dim
holds them) and starts as the identity on the measured statistics: ``running_mean = mu``,
``running_var = sigma^2``, ``weight = sqrt(sigma^2 + eps)``, ``bias = mu``. In eval mode it
is exactly the identity at surgery (``variant="identity"``); in training mode it normalises
with batch statistics, which tames exploding activations and their gradients, and it learns
its scale during healing. ``variant="standardize"`` (bounded) starts at weight 1, bias 0 --
the pre-activations are standardised at once (for saturated units), and the output change
is measured. On a ``torch.fx``-traceable model the norm is a node of the graph; on any
other (every Hugging Face model) the ``torch.export`` graph checks that the layer is called
once and the norm runs as a forward hook on the layer, registered as its child
``gs_norm_<layer>``: the model stays an ordinary ``nn.Module`` and no existing parameter is
renamed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .._problems import Problem
from ..passes.fx.coupling import producer_channel_dim
from ..passes.fx.rewrite import RewriteError, insert_after, module_node
from ._base import Applied, Refused, Replacement, Target
from ._edit import get_layer


class ChannelBatchNorm(_BatchNorm):
    """BatchNorm over the units on ``channel_dim`` (``-1`` for Linear outputs of any rank)."""

    def __init__(self, num_features: int, channel_dim: int = 1, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.channel_dim = channel_dim

    def _check_input_dim(self, input: torch.Tensor) -> None:  # torch's name
        if input.dim() < 2:
            raise ValueError(f"ChannelBatchNorm needs >= 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # torch's name
        x = input.movedim(self.channel_dim, 1)
        return super().forward(x).movedim(1, self.channel_dim)


class NormInsert(Replacement):
    """Insert a BatchNorm after a layer, initialised as the identity on measured statistics."""

    name = "norm_insert"
    treats = ("ExplodingGradient", "Saturation")
    scales = ("layer",)
    guarantee = "exact"
    judged_after_healing = True
    priority = 20

    @staticmethod
    def _layers(problem: Problem) -> list[str]:
        return list(problem.span or (problem.site.module,))

    def check(self, problem: Problem, target: Target) -> str | None:
        why = super().check(problem, target)
        if why:
            return why
        gm, _ = target.graph_module()
        try:
            for layer in self._layers(problem):
                get_layer(target, layer)
                if gm is not None:
                    module_node(gm, layer)
                else:
                    target.module_block(layer)
        except (Refused, RewriteError) as e:
            return str(e)
        return None

    def propose(self, problem: Problem, target: Target, *, exact: bool = False
                ) -> dict[str, Any]:
        variant = "identity" if exact or problem.kind != "Saturation" else "standardize"
        return {"variant": variant, "layers": self._layers(problem),
                "exact": variant == "identity"}

    def is_exact(self, params: dict[str, Any]) -> bool:
        return params.get("variant", "identity") == "identity"

    def exact_fallback(self, params: dict[str, Any]) -> dict[str, Any] | None:
        if self.is_exact(params):
            return None
        return {**params, "variant": "identity", "exact": True}

    def apply_torch(self, target: Target, problem: Problem, params: dict[str, Any]) -> Applied:
        layers = [str(x) for x in params.get("layers") or self._layers(problem)]
        identity = self.is_exact(params)
        stats = {}
        for layer in layers:
            mod = get_layer(target, layer)
            out = target.capture(layer, output=True).to(torch.float64)
            dim = producer_channel_dim(mod) % out.dim()  # Linear/Conv1D: last; conv: 1
            flat = out.movedim(dim, 0).reshape(out.shape[dim], -1)
            stats[layer] = (flat.mean(1), flat.var(1, unbiased=False), dim, out.dim())
        gm, _ = target.graph_module()
        applied = Applied(exact=identity, modules=list(layers))
        for layer in layers:
            mean, var, dim, ndim = stats[layer]
            mod = get_layer(target, layer)
            bn = ChannelBatchNorm(int(mean.numel()), channel_dim=dim - ndim if dim else 1,
                                  device=mod.weight.device, dtype=mod.weight.dtype)
            with torch.no_grad():
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                if identity:
                    bn.weight.copy_((var + bn.eps).sqrt())
                    bn.bias.copy_(mean)
            if gm is None:  # the module tree, mapped by the exported graph
                target.module_block(layer)
                name = target.attach_after(layer, bn, "gs_norm")
            else:
                try:
                    name = insert_after(gm, module_node(gm, layer), bn, f"gs_norm_{layer}")
                except RewriteError as e:
                    raise Refused(str(e)) from None
            applied.modules.append(name)
            applied.new_parameters += [f"{name}.weight", f"{name}.bias"]
        if gm is not None:
            target.set_model(gm)
        applied.details.update({"variant": "identity" if identity else "standardize",
                                "layers": layers})
        return applied
