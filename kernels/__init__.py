"""graphsurg.kernels -- the statistics engine.

``neuron_stats(x, channel_dim)`` reduces an activation tensor to per-channel statistics in
one pass; ``grad_sq_norms`` / ``row_sq_norms`` measure gradients. On CUDA tensors the Triton
kernels run (``_neuron_stats_triton``, ``_grad_norms_triton``, ``_row_norms_triton``); on CPU
a small C kernel compiled on first use (``_neuron_stats_cpu``), or row-chunked torch where it
cannot be built (``_neuron_stats_chunked``). The pure-torch reference stays available as
``backend="torch"``. Triton is imported lazily: the CPU path works without it.
"""

from ._multi_stats import PACKED_ROWS as PACKED_ROWS
from ._multi_stats import all_reduce_packed as all_reduce_packed
from ._multi_stats import merge_packed as merge_packed
from ._multi_stats import multi_grad_sq_norms as multi_grad_sq_norms
from ._multi_stats import packed_from_sums as packed_from_sums
from ._multi_stats import packed_to_stats as packed_to_stats
from ._multi_stats import partial_sums as partial_sums
from ._multi_stats import partial_sums_many as partial_sums_many
from ._multi_stats import stats_to_packed as stats_to_packed
from ._norms import grad_sq_norms as grad_sq_norms
from ._norms import row_sq_norms as row_sq_norms
from ._stats import NeuronStats as NeuronStats
from ._stats import neuron_stats as neuron_stats

__all__ = ["NeuronStats", "neuron_stats", "grad_sq_norms", "row_sq_norms", "PACKED_ROWS",
           "all_reduce_packed", "merge_packed", "multi_grad_sq_norms", "packed_from_sums",
           "packed_to_stats", "partial_sums", "partial_sums_many", "stats_to_packed"]
