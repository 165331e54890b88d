"""grad_sq_norms and row_sq_norms, torch and Triton (interpreter) paths, against float64."""

from __future__ import annotations

import pytest
import torch
from graphsurg.kernels import grad_sq_norms, row_sq_norms
from graphsurg.kernels._grad_norms_triton import grad_sq_norms_triton
from graphsurg.kernels._row_norms_triton import row_sq_norms_triton

# Relative tolerance against float64, by the accumulation dtype: float32 sums of up to a few
# thousand squares (fp16/bf16 convert exactly to float32 first) vs float64 sums.
RTOL = {torch.float32: 2e-6, torch.float64: 1e-12}
BACKENDS = ["torch", "triton"]


def _tensors(g: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.randn(70, 33, generator=g),  # Linear weight
        torch.randn(70, generator=g),  # bias
        torch.randn(16, 3, 3, 3, generator=g),  # conv weight
        torch.randn(1, generator=g),  # one element
        torch.randn(3000, generator=g).to(torch.float16),  # mixed dtypes
        torch.randn(500, generator=g).to(torch.bfloat16),
        torch.randn(40, 60, generator=g)[:, ::2],  # non-contiguous
        torch.zeros(0),  # empty parameter: contributes 0
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_sq_norms_mixed_list(backend: str) -> None:
    ts = _tensors(torch.Generator().manual_seed(0))
    ref = torch.stack([t.to(torch.float64).pow(2).sum() for t in ts])
    out = grad_sq_norms(ts, backend=backend)
    assert out.shape == (len(ts),) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.float32], atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_sq_norms_float64(backend: str) -> None:
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(300, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g)]
    ref = torch.stack([t.to(torch.float64).pow(2).sum() for t in ts])
    out = grad_sq_norms(ts, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[0], ref[0], rtol=RTOL[torch.float64], atol=0.0)
    torch.testing.assert_close(out[1], ref[1], rtol=RTOL[torch.float32], atol=0.0)


def test_grad_sq_norms_triton_many_chunks_and_tiny_neighbour() -> None:
    """A tensor cut into many chunks next to one 1e-6 as large: each total is summed from
    its own partials only, so the small one keeps full relative precision."""
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(5000, generator=g) * 1e3, torch.randn(3, generator=g) * 1e-3]
    ref = torch.stack([t.double().pow(2).sum() for t in ts])
    out = grad_sq_norms_triton(ts, chunk=256, block=64)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.float32], atol=0.0)


def test_grad_sq_norms_does_not_modify_inputs() -> None:
    ts = _tensors(torch.Generator().manual_seed(3))
    before = [t.clone() for t in ts]
    grad_sq_norms(ts, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(ts, before, strict=True))


ROW_CASES = {
    "linear": lambda g: torch.randn(70, 33, generator=g),
    "conv": lambda g: torch.randn(16, 3, 3, 3, generator=g),
    "conv_channels_last": lambda g: torch.randn(8, 3, 3, 3, generator=g).contiguous(
        memory_format=torch.channels_last
    ),
    "bias": lambda g: torch.randn(9, generator=g),
    "few_long_rows": lambda g: torch.randn(3, 5000, generator=g),
    "strided": lambda g: torch.randn(40, 60, generator=g)[:, ::2],
    "fp16": lambda g: torch.randn(20, 50, generator=g).to(torch.float16),
    "bf16": lambda g: torch.randn(20, 50, generator=g).to(torch.bfloat16),
    "fp64": lambda g: torch.randn(20, 50, generator=g, dtype=torch.float64),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_row_sq_norms(case: str, backend: str) -> None:
    w = ROW_CASES[case](torch.Generator().manual_seed(4))
    ref = w.to(torch.float64).reshape(w.shape[0], -1).pow(2).sum(1)
    out = row_sq_norms(w, backend=backend)
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    assert out.shape == (w.shape[0],) and out.dtype == acc
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[acc], atol=0.0)


def test_row_sq_norms_triton_splits() -> None:
    w = torch.randn(5, 1000, generator=torch.Generator().manual_seed(5))
    ref = w.double().pow(2).sum(1)
    out = row_sq_norms_triton(w, block_r=2, block_k=32, splits=7)
    torch.testing.assert_close(out.double(), ref, rtol=RTOL[torch.float32], atol=0.0)
