"""graphsurg.kernels -- the statistics engine.

``neuron_stats(x, channel_dim)`` reduces an activation tensor to per-channel statistics in
one pass; ``grad_sq_norms`` / ``row_sq_norms`` measure gradients. On CUDA tensors the Triton
kernels run (``_neuron_stats_triton``, ``_grad_norms_triton``, ``_row_norms_triton``); on CPU
a small C kernel compiled on first use (``_neuron_stats_cpu``), or row-chunked torch where it
cannot be built (``_neuron_stats_chunked``). The pure-torch reference stays available as
``backend="torch"``. Triton is imported lazily: the CPU path works without it.
"""

from ._norms import grad_sq_norms as grad_sq_norms
from ._norms import row_sq_norms as row_sq_norms
from ._stats import NeuronStats as NeuronStats
from ._stats import neuron_stats as neuron_stats

__all__ = ["NeuronStats", "neuron_stats", "grad_sq_norms", "row_sq_norms"]
