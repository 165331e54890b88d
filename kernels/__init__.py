"""graphsurg.kernels -- the statistics engine.

``neuron_stats(x, channel_dim)`` reduces an activation tensor to per-channel statistics in
one pass; ``grad_sq_norms`` / ``row_sq_norms`` measure gradients. On CUDA tensors the Triton
kernels run; on CPU a tuned torch path runs. Triton is imported lazily.
"""

from ._norms import grad_sq_norms as grad_sq_norms
from ._norms import row_sq_norms as row_sq_norms
from ._stats import NeuronStats as NeuronStats
from ._stats import neuron_stats as neuron_stats

__all__ = ["NeuronStats", "neuron_stats", "grad_sq_norms", "row_sq_norms"]
