"""What both IR adapters read as a layer beyond the plain op tables: an einsum with a weight.

Kept here, in the data layer, so the torch and ONNX adapters parse an equation the same way.
"""

from __future__ import annotations

from collections.abc import Sequence


def einsum_layer(equation: str, is_weight: Sequence[bool]) -> tuple[int, bool, int] | None:
    """How a two-operand einsum is a linear layer, or None.

    ``is_weight[k]``: operand ``k`` is a 2-D parameter/constant. Returns ``(k, transposed,
    axis)``: the weight operand, whether it is stored ``(d_in, d_out)`` (so the layer's
    ``(d_out, d_in)`` weight is its transpose), and the unit axis of the output (negative when
    counted from the end). ``"bi,oi->bo"`` is ``(1, False, -1)``; ``"bi,io->bo"`` is
    ``(1, True, -1)``.
    """
    eq = equation.replace(" ", "")
    if "->" not in eq:
        return None
    ins, outs = eq.split("->")
    specs = ins.split(",")
    if len(specs) != 2 or len(is_weight) != 2:
        return None
    for k in (0, 1):
        if not is_weight[k] or len(specs[k]) != 2 or "." in specs[k]:
            continue
        a, b = specs[k][0], specs[k][1]
        other = specs[1 - k]
        if a in outs and b in other and b not in outs and a not in other:
            unit, transposed = a, False
        elif b in outs and a in other and a not in outs and b not in other:
            unit, transposed = b, True
        else:  # a unit letter the input also carries is a batch axis, not a layer's units
            return None
        if "..." in outs and outs.index(unit) < outs.index("..."):
            axis = outs.index(unit)
        else:
            tail = outs.split("...")[-1]
            axis = tail.index(unit) - len(tail)
        return k, transposed, axis
    return None


__all__ = ["einsum_layer"]
