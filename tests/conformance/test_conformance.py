"""The CI third of the conformance corpus (issue 14): ``corpus.QUICK`` architectures x the
checks of ``CI_CHECKS`` (the dynamo ONNX export runs in the full ``make conformance`` only:
it alone costs as much as the other checks together).

``KNOWN_FAILURES`` is the one table of (architecture, check) pairs graphsurg does not pass
yet, each with the class of issue 14's list it falls in. The marks are strict: a fix that
makes a pair pass turns its test into a failure ("XPASS(strict)") that tells the fixer to
delete the pair from the table.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from .corpus import QUICK
from .runner import run_check

CI_CHECKS = ("healthy", "dead", "collapsed", "saturated", "vanishing", "operate", "onnx_legacy")

# issue 14's failure classes
C1 = "issue 14 class 1: decomposed activation read as its pieces (tanh/sigmoid of GELU)"
C2 = "issue 14 class 2: ReLU6 read as hardtanh"
C3 = "issue 14 class 3: layer op not recognised (addmm, matmul, conv2d.padding)"
C4 = "issue 14 class 4: producer hidden behind layout ops"
C5 = "issue 14 class 5: coupling probed only at units 0 and width-1 / residual add missed"
C6 = "issue 14 class 6: design read as disease (narrow layer, LayerScale, SE dormancy)"
C7 = "issue 14 class 7: symbolic_trace fails on Hugging Face models"
C8 = "issue 14 class 8: ONNX-side gap (Clip typing, gated units, dormancy rule)"

#: (architecture, check) -> why it fails today; delete a pair when its fix lands.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _params() -> list[pytest.param]:
    out = []
    for arch in QUICK:
        for check in CI_CHECKS:
            marks = []
            if (arch, check) in KNOWN_FAILURES:
                marks.append(pytest.mark.xfail(strict=True,
                                               reason=KNOWN_FAILURES[(arch, check)]))
            out.append(pytest.param(arch, check, marks=marks, id=f"{arch}-{check}"))
    return out


def test_known_failures_name_real_pairs() -> None:
    stale = [k for k in KNOWN_FAILURES if k[0] not in QUICK or k[1] not in CI_CHECKS]
    assert not stale, f"KNOWN_FAILURES names pairs CI does not run: {stale}"


@pytest.mark.parametrize("arch,check", _params())
def test_conformance(arch: str, check: str) -> None:
    r = run_check(arch, check)
    if r.status == "n/a":
        pytest.skip(f"{check} does not apply to {arch}: {r.reason}")
    assert r.status == "pass", f"{arch} {check}: {r.status}: {r.reason}"
