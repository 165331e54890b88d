"""Ablations behind FINDINGS.md (not part of the report run):
``python -m benchmarks.efficacy.ablations [--seeds N] [--out DIR]``.

Dying ReLU (experiment 1), graphsurg's arms only, with

* ``median_live``: reset rows rescaled to the live rows' median norm (the old default),
  ``ReinitDead(init="median_live")``, instead of the layer's initialiser;
* ``every layer``: ``DiagnoseConfig(dormant_every_layer=True)`` (ReDo's policy: every layer's
  dormant units once one layer is broken).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

import graphsurg as gs
from graphsurg.library import Library, ReinitDead

from . import dying_relu
from .common import mean_std


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.efficacy.ablations")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("/tmp/efficacy_ablations"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", category=UserWarning)
    seeds = list(range(a.seeds))
    arms = ("graphsurg operate", "graphsurg callback")
    variants = {
        "median_live": dict(library=_median_live_library()),
        "every layer": dict(config=gs.DiagnoseConfig(dormant_every_layer=True)),
    }
    out = {}
    for name, kw in variants.items():
        r = dying_relu.run(seeds, False, a.out, arms=arms, **kw)
        out[name] = {arm: r["metrics"][arm]["final loss"] for arm in arms}
        for arm in arms:
            m, s = mean_std(out[name][arm])
            print(f"{name} / {arm}: held-out MSE {m:.4g} ± {s:.2g} {out[name][arm]}",
                  flush=True)
    (a.out / "ablations.json").write_text(json.dumps(out, indent=1) + "\n")


def _median_live_library() -> Library:
    return Library([ReinitDead(init="median_live") if r.reinitialises_units else r
                    for r in gs.default_library()])


if __name__ == "__main__":
    main()
