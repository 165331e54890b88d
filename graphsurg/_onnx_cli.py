"""The ``onnx`` subcommand: ``graphsurg onnx analyze|apply|list-passes``.

``add_parser(subparsers)`` adds it to the ``graphsurg`` command line; ``run(args)`` executes
it and returns the exit code: 0 ok, 1 certificates not met (a site was rolled back), 2 bad
input (one line on stderr). ``apply`` is exact by default (excision of dead units, exact
low-rank factoring, cleanup); ``--allow-inexact`` (or ``--max-output-change`` with ``-p``)
lets function-changing replacements run. Flags follow onnxsim/polygraphy where they overlap
(``--save-external-data``, ``--external-data-size-threshold``).
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
    _calibration_args(a)
    a.add_argument("--max-batches", type=int, default=None, help="measure at most N batches")
    a.add_argument("--json", dest="json_out", default=None, help="write the diagnosis JSON here")

    b = sub.add_parser("apply", help="treat the diagnosed problems site by site, verify on "
                       "held-out data, roll back failing sites, write the model (exact by "
                       "default)")
    b.add_argument("model", help="input .onnx model (never modified)")
    b.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    _calibration_args(b)
    b.add_argument("-p", "--passes", default=None,
                   help="comma-separated replacement names (default: every exact one; see "
                        "list-passes)")  # fmt: skip
    b.add_argument("--diagnosis", default=None,
                   help="use this diagnosis JSON instead of analysing; without calibration "
                        "data the edits are applied unverified (the summary says so)")
    b.add_argument("--max-output-change", type=float, default=None,
                   help="bound on ||f'-f||/||f|| for edits that are not exact; with -p it "
                        "also allows them")  # fmt: skip
    b.add_argument("--allow-inexact", action="store_true",
                   help="let function-changing replacements run (default: exact edits only)")
    b.add_argument("--exact-tolerance", type=float, default=None,
                   help="bound on ||f'-f||/||f|| for exact edits (float round-off)")  # fmt: skip
    b.add_argument("--save-external-data", action="store_true",
                   help="write tensors to <output>.data (always done for models that had it)")  # fmt: skip
    b.add_argument("--external-data-size-threshold", type=int, default=1024,
                   help="tensors above this many bytes go to external data (default 1024)")  # fmt: skip
    b.add_argument("--report", default=None, help="write the result JSON here")

    sub.add_parser("list-passes", help="list the replacements apply can run (-p names)")
    p.set_defaults(func=run)
    return p


def _calibration_args(p: argparse.ArgumentParser) -> None:
    """The calibration options of ``analyze`` and ``apply`` (formats:
    :mod:`graphsurg.passes.onnx.inputs`); exactly one source is required."""
    p.add_argument("--data", default=None,
                   help="calibration data: an .npz (one array per input, split along each "
                        "input's batch axis) or a folder of .npz files (one feed dict each)")
    p.add_argument("--load-inputs", default=None, metavar="INPUTS.json",
                   help="feed dicts saved by polygraphy run --save-inputs")
    p.add_argument("--data-loader-script", default=None, metavar="FILE.py[:FUNC]",
                   help="a script whose FUNC (default load_data) yields feed dicts; this RUNS "
                        "the script (every other input is only read)")
    p.add_argument("--batch-axis", action="append", default=[], metavar="NAME:AXIS",
                   help="the batch axis of input NAME (NAME:none: fed whole to every batch); "
                        "default: read from the model")
    p.add_argument("--batch-size", type=int, default=64, help="rows per batch (default 64)")


def _calibration(args: argparse.Namespace, gso: Any, *, optional: bool = False
                 ) -> tuple[Any, dict[str, Any]]:
    """``(data, keyword arguments)`` for gso.analyze / gso.apply from the options; with
    ``optional`` (apply with ``--diagnosis``) no data at all gives None."""
    from graphsurg.passes.onnx.inputs import parse_batch_axes

    given = [o for o, v in (("--data", args.data), ("--load-inputs", args.load_inputs),
                            ("--data-loader-script", args.data_loader_script)) if v]
    if optional and not given:
        return None, {"batch_size": args.batch_size,
                      "batch_axes": parse_batch_axes(args.batch_axis)}
    if len(given) != 1:
        raise gso.OnnxInputError(
            "pass exactly one of --data, --load-inputs, --data-loader-script"
            + (f" (got {', '.join(given)})" if given else ""))
    kw = {"batch_size": args.batch_size, "batch_axes": parse_batch_axes(args.batch_axis),
          "data_loader_script": args.data_loader_script}
    return (args.data or args.load_inputs or []), kw


def _no_collision(args: argparse.Namespace, gso: Any, outputs: list[tuple[str, Any]]) -> None:
    """Refuse an output path that is the model, its calibration data or another output."""
    from graphsurg._errors import BadInputError
    from graphsurg._files import check_no_collision

    script = (args.data_loader_script.rpartition(":")[0] or args.data_loader_script
              if args.data_loader_script else None)
    data = [args.model, args.data, args.load_inputs, script, getattr(args, "diagnosis", None)]
    if args.data and Path(args.data).is_dir():
        data += sorted(Path(args.data).glob("*.npz"))
    try:
        check_no_collision(data, outputs)
    except BadInputError as e:
        raise gso.OnnxInputError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``onnx`` subcommand; returns the exit code (0, 1 or 2)."""
    from graphsurg import onnx as gso

    try:
        if args.onnx_command == "list-passes":
            for name, doc in gso.describe_passes().items():
                print(f"{name:<20} {doc}")
            return EXIT_OK
        if args.onnx_command == "analyze":
            from graphsurg import DiagnoseConfig

            _no_collision(args, gso, [("--json", args.json_out)])
            data, kw = _calibration(args, gso)
            cfg = DiagnoseConfig(max_batches=args.max_batches)
            d = gso.analyze(args.model, data, config=cfg, **kw)
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
    if args.exact_tolerance is not None:
        changes["exact_tolerance"] = args.exact_tolerance
    try:
        cert = Certificates(**changes)
    except ValueError as e:
        raise gso.OnnxInputError(str(e)) from None
    passes = [s.strip() for s in args.passes.split(",") if s.strip()] if args.passes else None
    out_data = args.output + ".data" if args.output else None
    _no_collision(args, gso, [("-o", args.output), ("-o's data file", out_data),
                              ("--report", args.report)])
    calib, kw = _calibration(args, gso, optional=bool(args.diagnosis))
    if args.diagnosis:
        try:
            diag = Diagnosis.from_json(Path(args.diagnosis).read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise gso.OnnxInputError(f"diagnosis '{args.diagnosis}' is unreadable: {e}") from None
        first: Any = diag
        data = calib
    else:
        first, data = calib, None
    _, result = gso.apply(
        args.model,
        first,
        passes,
        certificates=cert,
        data=data,
        allow_inexact=args.allow_inexact,
        max_output_change=args.max_output_change,
        output=args.output,
        save_external_data=args.save_external_data,
        external_data_size_threshold=args.external_data_size_threshold,
        **kw,
    )
    print(result.summary())
    if args.report:
        _write_text(args.report, result.to_json(indent=2))
    return EXIT_OK if result.ok else EXIT_CERTIFICATES


def _write_text(path: str, text: str) -> None:
    from graphsurg._files import write_text

    write_text(path, text)
