"""The ``onnx`` subcommand: ``graphsurg onnx analyze|apply|list-passes``.

``add_parser(subparsers)`` adds it to the ``graphsurg`` command line; ``run(args)`` executes
it and returns the exit code: 0 ok, 1 certificates not met (a pass was rolled back), 2 bad
input (one line on stderr). Standalone: ``python -m graphsurg.passes.onnx.cli onnx ...``.
Flags follow onnxsim/polygraphy where they overlap (``--save-external-data``,
``--external-data-size-threshold``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_CERTIFICATES, EXIT_BAD_INPUT = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``onnx`` subcommand (with ``analyze``, ``apply``, ``list-passes``) to an
    ``argparse`` subparsers object and return its parser."""
    p = subparsers.add_parser(
        "onnx",
        help="analyze and optimise ONNX models (onnxruntime calibration, graph passes)",
        description="graphsurg as an ONNX optimizer pass.",
    )
    sub = p.add_subparsers(dest="onnx_command", metavar="{analyze,apply,list-passes}")
    sub.required = True

    a = sub.add_parser("analyze", help="diagnose a model on calibration data")
    a.add_argument("model", help="input .onnx model")
    a.add_argument("--data", required=True, help="calibration data (.npz, one array per input)")
    a.add_argument("--batch-size", type=int, default=64, help="rows per batch (default 64)")
    a.add_argument("--max-batches", type=int, default=None, help="measure at most N batches")
    a.add_argument("--json", dest="json_out", default=None, help="write the diagnosis JSON here")

    b = sub.add_parser("apply", help="run the passes, verify, write the optimised model")
    b.add_argument("model", help="input .onnx model (never modified)")
    b.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    b.add_argument("--data", required=True, help="calibration data (.npz); a quarter is held out")
    b.add_argument("-p", "--passes", default=None,
                   help="comma-separated pass names (default: all; see list-passes)")  # fmt: skip
    b.add_argument("--diagnosis", default=None, help="use this diagnosis JSON instead of analysing")
    b.add_argument("--batch-size", type=int, default=64, help="rows per batch (default 64)")
    b.add_argument("--max-output-change", type=float, default=None,
                   help="bound on ||f'-f||/||f|| for passes that are not exact")  # fmt: skip
    b.add_argument("--exact-tolerance", type=float, default=None,
                   help="bound on ||f'-f||/||f|| for exact passes (float round-off)")  # fmt: skip
    b.add_argument("--save-external-data", action="store_true",
                   help="write tensors to <output>.data (always done for models that had it)")  # fmt: skip
    b.add_argument("--external-data-size-threshold", type=int, default=1024,
                   help="tensors above this many bytes go to external data (default 1024)")  # fmt: skip
    b.add_argument("--report", default=None, help="write the report JSON here")

    sub.add_parser("list-passes", help="list the available passes")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``onnx`` subcommand; returns the exit code (0, 1 or 2)."""
    from graphsurg import onnx as gso

    try:
        if args.onnx_command == "list-passes":
            from graphsurg.passes.onnx._registry import describe_passes

            for name, doc in describe_passes().items():
                print(f"{name:<20} {doc}")
            return EXIT_OK
        if args.onnx_command == "analyze":
            from graphsurg import DiagnoseConfig

            cfg = DiagnoseConfig(max_batches=args.max_batches)
            d = gso.analyze(args.model, args.data, config=cfg, batch_size=args.batch_size)
            print(d.summary())
            if args.json_out:
                _write_text(args.json_out, d.to_json(indent=2))
            return EXIT_OK
        if args.onnx_command == "apply":
            return _apply(args, gso)
    except gso.OnnxInputError as e:
        print(f"graphsurg onnx: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"graphsurg onnx: error: unknown command {args.onnx_command!r}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _apply(args: argparse.Namespace, gso: Any) -> int:
    from graphsurg import Certificates, Diagnosis

    changes: dict[str, Any] = {}
    if args.max_output_change is not None:
        changes["max_output_change"] = args.max_output_change
    if args.exact_tolerance is not None:
        changes["exact_tolerance"] = args.exact_tolerance
    try:
        cert = Certificates(**changes)
    except ValueError as e:
        raise gso.OnnxInputError(str(e)) from None
    passes = [s.strip() for s in args.passes.split(",") if s.strip()] if args.passes else None
    if args.diagnosis:
        try:
            diag = Diagnosis.from_json(Path(args.diagnosis).read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise gso.OnnxInputError(f"diagnosis '{args.diagnosis}' is unreadable: {e}") from None
        first: Any = diag
        data = args.data
    else:
        first, data = args.data, None
    _, report = gso.apply(
        args.model,
        first,
        passes,
        certificates=cert,
        data=data,
        output=args.output,
        save_external_data=args.save_external_data,
        external_data_size_threshold=args.external_data_size_threshold,
        batch_size=args.batch_size,
    )
    print(report.summary())
    if args.report:
        _write_text(args.report, report.to_json(indent=2))
    return EXIT_OK if report.ok else EXIT_CERTIFICATES


def _write_text(path: str, text: str) -> None:
    import os
    import tempfile

    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or Path("."))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m graphsurg.passes.onnx.cli onnx <command> ...``
    (the leading ``onnx`` may be omitted)."""
    parser = argparse.ArgumentParser(prog="graphsurg")
    subs = parser.add_subparsers(dest="command")
    add_parser(subs)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "onnx":
        argv = ["onnx", *argv]
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
