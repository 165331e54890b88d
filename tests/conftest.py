"""Test set-up. Runs before anything imports triton: without a CUDA device, the Triton
kernels run through the Triton interpreter, so CI tests the kernels themselves."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/zoo is importable as `zoo` from tests and benchmarks
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))
