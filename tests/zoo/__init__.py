"""The broken-network zoo: small networks with planted, known problems.

Every builder returns a :class:`ZooCase` -- the model, a list of batches, a loss function and
the ground truth -- seeded and small enough for CPU CI. Tests and benchmarks import it
(``from zoo import dead_mlp``); the demo embeds the same builders through
``graphsurg._zoo``.
"""

from __future__ import annotations

from graphsurg._zoo import (
    ZOO,
    Truth,
    ZooCase,
    bottleneck_mlp,
    build,
    dead_cnn,
    dead_mlp,
    deep_sigmoid,
    healthy_cnn,
    healthy_mlp,
    lowrank_mlp,
    nan_mlp,
    saturated_mlp,
    transformer_block,
)

__all__ = [
    "ZOO",
    "Truth",
    "ZooCase",
    "bottleneck_mlp",
    "build",
    "dead_cnn",
    "dead_mlp",
    "deep_sigmoid",
    "healthy_cnn",
    "healthy_mlp",
    "lowrank_mlp",
    "nan_mlp",
    "saturated_mlp",
    "transformer_block",
]
