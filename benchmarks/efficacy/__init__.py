"""Efficacy experiments: does surgery heal? graphsurg against the known remedies.

``python -m benchmarks.efficacy [--quick] [--seeds N] [--only NAME,...] [--out DIR]`` runs
them and writes ``RESULTS.md``, ``results.json`` and the PNG plots to ``--out`` (default:
this folder). See ``RESULTS.md`` for the set-ups and the findings.
"""

EXPERIMENTS = ("dying_relu", "vanishing", "bottleneck", "plasticity")
#: run only when named by ``--only`` (not in the default list, so not in ``--quick``/CI:
#: importing ``transformers`` alone takes longer than the other quick experiments together)
OPTIONAL = ("transformer",)
