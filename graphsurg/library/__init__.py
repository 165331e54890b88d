"""The surgery library: replacements for the problems graphsurg diagnoses.

One replacement per module:

==================  =========================================  =======  =======================
replacement         treats                                     scale    guarantee
==================  =========================================  =======  =======================
reinit_dead         DeadNeurons, Saturation, NonFinite         neuron   exact on dead units
activation_swap     DeadNeurons (dying ReLU)                   layer    bounded (ramp: exact)
residual_bypass     VanishingGradient                          block    bounded (gated: exact)
widen               Bottleneck (narrow, rank)                  layer    exact
factor_low_rank     Bottleneck (rank-deficient weight)         layer    exact (rank tolerance)
norm_insert         ExplodingGradient, Saturation              layer    exact (eval mode)
excise_dead         DeadNeurons (constant units)               neuron   exact on the data
dropout             Overfitting                                layer    exact (eval mode)
attention           MixingCollapse (or on request)             block    exact (zero gate)
distill             escalation / on request                    module   bounded (reported error)
plasticity_inj...   LostPlasticity                             module   exact
==================  =========================================  =======  =======================

Register your own with :meth:`Library.register` (subclass :class:`Replacement`).
"""

from ._base import SCALES as SCALES
from ._base import Applied as Applied
from ._base import Library as Library
from ._base import Refused as Refused
from ._base import Replacement as Replacement
from ._base import Target as Target
from .activation_swap import ActivationSwap as ActivationSwap
from .activation_swap import RampLeakyReLU as RampLeakyReLU
from .activation_swap import ramp_schedule as ramp_schedule
from .attention import Attention as Attention
from .attention import GatedAttention as GatedAttention
from .distill import Distill as Distill
from .dropout import Dropout as Dropout
from .excise_dead import ExciseDead as ExciseDead
from .factor_low_rank import FactorLowRank as FactorLowRank
from .norm_insert import ChannelBatchNorm as ChannelBatchNorm
from .norm_insert import NormInsert as NormInsert
from .plasticity_injection import InjectedHead as InjectedHead
from .plasticity_injection import PlasticityInjection as PlasticityInjection
from .reinit_dead import ReinitDead as ReinitDead
from .residual_bypass import Bypass as Bypass
from .residual_bypass import ResidualBypass as ResidualBypass
from .widen import Widen as Widen


def default_library() -> Library:
    """A fresh library holding the canonical replacements (safe to register into): the
    neuron/layer/block ones and the module-scale ones (dropout, zero-gated attention,
    distill, plasticity injection) that escalation reaches. Distill is planned only by
    escalation or ``prefer=``; the other three treat only their own problem kinds."""
    return Library([ReinitDead(), ActivationSwap(), ResidualBypass(), Widen(), NormInsert(),
                    ExciseDead(), FactorLowRank(), Dropout(), Attention(), Distill(),
                    PlasticityInjection()])


def canonical_library() -> Library:
    """Alias of :func:`default_library` (kept for code written against it)."""
    return default_library()


__all__ = [
    "SCALES",
    "ActivationSwap",
    "Applied",
    "Attention",
    "Bypass",
    "ChannelBatchNorm",
    "Distill",
    "Dropout",
    "ExciseDead",
    "FactorLowRank",
    "GatedAttention",
    "InjectedHead",
    "Library",
    "NormInsert",
    "PlasticityInjection",
    "RampLeakyReLU",
    "Refused",
    "ReinitDead",
    "Replacement",
    "ResidualBypass",
    "Target",
    "Widen",
    "canonical_library",
    "default_library",
    "ramp_schedule",
]
