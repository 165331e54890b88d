"""The ``graphsurg`` command line: ``demo``, ``diagnose``, ``operate``, ``onnx``.

Exit codes: 0 success; 1 surgery could not meet the certificates (a schema was rolled back
or no plan exists); 2 bad input (unreadable file, bad module path, data that does not fit the
model), reported in one line on stderr; 3 an internal error (a bug: please report it).
Tracebacks are shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from ._errors import BadInputError, GraphsurgError, first_line

EXIT_OK, EXIT_CERTIFICATES, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

SPEC_NOTE = (
    "A package.module:callable spec (for MODEL, DATA or --loss) imports that module and runs "
    "that callable: it executes your own code, by design -- use only code you trust. Files are "
    "never executed: .pt2 archives are read part by part (tensors only; pickles only through "
    "weights_only=True; compiled code and graphs calling anything but torch operators are "
    "refused), .pt data with torch.load(weights_only=True), .npz with allow_pickle=False. "
    "Outputs never overwrite an input (refused before any work) and are written atomically."
)
EXIT_NOTE = (
    "exit codes: 0 success, 1 surgery could not meet the certificates, 2 bad input (one-line "
    "message on stderr), 3 internal error. --debug shows tracebacks."
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(debug_default: Any) -> _Parser:
    p = _Parser(add_help=False)
    p.add_argument("--debug", action="store_true", default=debug_default,
                   help="show tracebacks and warnings")
    p.add_argument("-q", "--quiet", action="store_true", default=debug_default,
                   help="plain output, results only (no progress, no chatter)")
    p.add_argument("--threads", type=int, metavar="N",
                   default=None if debug_default is False else argparse.SUPPRESS,
                   help="CPU threads for this run (torch.set_num_threads, also used by the "
                        "statistics kernels); default: torch's choice, usually the core count")
    return p


def _model_data_args(p: argparse.ArgumentParser) -> None:
    from ._loaders import DATA_HELP

    p.add_argument("model", metavar="MODEL",
                   help="a .pt2 archive (torch.export.save) or package.module:factory (a callable "
                        "returning an nn.Module)")
    p.add_argument("--data", required=True, metavar="DATA", help=DATA_HELP)
    p.add_argument("--loss", default=None, metavar="LOSS",
                   help="mse, cross_entropy or package.module:fn called as fn(output, batch); "
                        "without it gradients are not checked")
    p.add_argument("--batch-size", type=int, default=64,
                   help="rows per batch for .npz/.pt arrays (default 64); a .pt2 exported with a "
                        "static batch size needs that size")
    p.add_argument("--max-batches", type=int, default=32, help="use at most N batches (default 32)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write report.html and report.json into the folder DIR (created if "
                        "needed; an existing file is refused)")


def build_parser() -> argparse.ArgumentParser:
    sub_common = _common(argparse.SUPPRESS)
    parser = _Parser(
        prog="graphsurg",
        description="Find where a neural network is broken and operate on its graph: "
                    "diagnose -> plan -> operate -> verify.",
        epilog=SPEC_NOTE + "\n\n" + EXIT_NOTE,
        parents=[_common(False)],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subs = parser.add_subparsers(dest="command", metavar="{demo,diagnose,operate,onnx}")

    d = subs.add_parser("demo", parents=[sub_common], epilog=EXIT_NOTE,
                        help="diagnose and operate on the embedded zoo of broken networks",
                        description="Run diagnose -> operate -> verify -> a short training of "
                                    "treated and untreated copies on the embedded zoo, print a "
                                    "before/after table per model and write the HTML report.")
    d.add_argument("-o", "--out", default="graphsurg-report", metavar="DIR",
                   help="report folder (default ./graphsurg-report)")
    d.add_argument("--models", default=None,
                   help="comma-separated zoo models (default dead_mlp,deep_sigmoid,"
                        "bottleneck_mlp,dead_cnn)")
    d.add_argument("--steps", type=int, default=150, help="training steps per copy (default 150)")
    d.add_argument("--seed", type=int, default=0, help="seed of the models, data and training")
    d.add_argument("--no-report", action="store_true", help="do not write the report")
    d.add_argument("--json", action="store_true", help="print the report JSON on stdout")
    d.set_defaults(func=cmd_demo)

    g = subs.add_parser("diagnose", parents=[sub_common], epilog=SPEC_NOTE + "\n\n" + EXIT_NOTE,
                        help="measure a torch model on data and list its problems",
                        description="Measure every neuron and layer of MODEL on DATA and name "
                                    "each problem found (the model is not modified).")
    _model_data_args(g)
    g.set_defaults(func=cmd_diagnose)

    o = subs.add_parser("operate", parents=[sub_common], epilog=SPEC_NOTE + "\n\n" + EXIT_NOTE,
                        help="diagnose, plan, operate and verify; write the operated model",
                        description="Diagnose MODEL on DATA, plan and apply the replacements, "
                                    "verify each against the certificates and write the operated "
                                    "model as a .pt2 archive (the input is never modified).")
    _model_data_args(o)
    o.add_argument("-o", "--output", default=None, metavar="OUT.pt2",
                   help="operated model archive (required unless --dry-run); the plan is "
                        "written next to it as OUT.plan.json")
    o.add_argument("--dry-run", action="store_true", help="show the plan without operating")
    o.add_argument("--max-output-change", type=float, default=None,
                   help="certificate: bound on ||f'-f||/||f|| for operations that are not exact")
    o.add_argument("--max-loss-increase", type=float, default=None,
                   help="certificate: allowed loss increase over the equally fine-tuned "
                        "untreated model")
    o.add_argument("--exact-only", action="store_true",
                   help="plan only function-preserving operations")
    o.set_defaults(func=cmd_operate)

    _add_onnx(subs, sub_common)
    return parser


def _add_onnx(subs: Any, sub_common: _Parser) -> None:
    """Wire ``graphsurg onnx ...`` to graphsurg._onnx_cli when it imports; else a stub
    that says the subcommand is unavailable (exit 2)."""
    try:
        from graphsurg import _onnx_cli as onnx_cli

        p = onnx_cli.add_parser(subs)
        for a in sub_common._actions:
            if a.option_strings and not any(s in p._option_string_actions for s in a.option_strings):
                p._add_action(a)
        p.set_defaults(func=lambda args: onnx_cli.run(args))
    except Exception as e:  # missing or broken: the rest of the CLI must keep working
        reason = f"{type(e).__name__}: {first_line(e)}"
        p = subs.add_parser("onnx", parents=[sub_common], help="ONNX passes (unavailable in this "
                            "build)", description=f"unavailable: {reason}")
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(args: argparse.Namespace) -> int:
            raise BadInputError(f"the onnx subcommand is unavailable in this build ({reason})")

        p.set_defaults(func=unavailable)


# -- commands -------------------------------------------------------------------------------

def _console(args: argparse.Namespace) -> Any:
    from ._console import Console

    # with --json, stdout carries JSON only: human output goes to stderr
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    return Console(quiet=args.quiet, stream=stream)


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import DEMO_MODELS, run_demo
    from ._zoo import ZOO

    models = DEMO_MODELS
    if args.models:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        bad = [m for m in models if m not in ZOO]
        if bad or not models:
            raise BadInputError(f"--models: unknown zoo model(s) {bad}; known: {', '.join(sorted(ZOO))}")
    if args.steps < 1:
        raise BadInputError(f"--steps must be >= 1, got {args.steps}")
    if not args.no_report:
        _check_paths([], report=("-o", args.out))
    console = _console(args)
    outcome = run_demo(console, models=models, steps=args.steps, seed=args.seed)
    if not args.no_report:
        html_path, json_path = outcome.report.write(args.out)
        console.result(f"report: {html_path.resolve()}  (data: {json_path.name})")
    console.info(f"demo finished in {outcome.seconds:.0f} s")
    if args.json:
        from ._problems import _finite

        print(json.dumps(_finite(outcome.report.to_dict())))
    return EXIT_OK if outcome.certificates_met else EXIT_CERTIFICATES


def _report_files(folder: str) -> list[Path]:
    return [Path(folder) / "report.html", Path(folder) / "report.json"]


def _check_paths(inputs: list[str], *, report: tuple[str, str | None] = ("--report", None),
                 files: list[tuple[str, str | os.PathLike[str]]] | None = None) -> None:
    """Before any work: refuse (one line, exit 2) an output that is an input or another
    output, a report folder that is an existing file, an output file that is a folder."""
    from ._files import check_no_collision
    from ._loaders import is_spec

    outs: list[tuple[str, str | os.PathLike[str] | None]] = list(files or [])
    what, folder = report
    if folder is not None:
        outs += [(what, folder)] + [(what, f) for f in _report_files(folder)]
    check_no_collision([p for p in inputs if not is_spec(p) and Path(p).exists()], outs)
    for w, p in files or []:
        if Path(p).is_dir():
            raise BadInputError(f"{w} {p} is a folder; name a file")
    if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
        raise BadInputError(f"{what} {folder} is an existing file; {what} names a folder "
                            "(report.html and report.json are written into it)")


def _check_numbers(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_batches is not None and args.max_batches < 1:
        raise BadInputError(f"--max-batches must be >= 1, got {args.max_batches}")


def _load(args: argparse.Namespace) -> tuple[Any, list[Any], Any]:
    from ._loaders import load_data, load_loss, load_model

    _check_numbers(args)
    model = load_model(args.model)
    data = load_data(args.data, batch_size=args.batch_size, max_batches=args.max_batches)
    loss = load_loss(args.loss)
    return model, data, loss


def cmd_diagnose(args: argparse.Namespace) -> int:
    import graphsurg as gs

    _check_numbers(args)
    _check_paths([args.model, args.data], report=("--report", args.report))
    console = _console(args)
    model, data, loss = _load(args)
    d = gs.diagnose(model, data, loss_fn=loss,
                    config=gs.DiagnoseConfig(max_batches=args.max_batches,
                                             progress=False if args.quiet else None))
    if args.json:
        print(d.to_json())
    else:
        console.result(d.summary())
    if args.report:
        from ._report import ModelReport, Report

        rep = Report(title=f"graphsurg diagnosis: {args.model}",
                     models=[ModelReport(name=Path(args.model).name, description=args.model, before=d,
                                         notes=list(d.notes))],
                     meta={"version": gs.__version__})
        html_path, _ = rep.write(args.report)
        console.result(f"report: {html_path.resolve()}")
        _say_missing_figures(console)
    return EXIT_OK


def _say_missing_figures(console: Any) -> None:
    """Without the report extra the report has tables only: say how to get the figures."""
    from ._report import missing_figures

    missing = missing_figures()
    if missing:
        console.info(missing)


def cmd_operate(args: argparse.Namespace) -> int:
    import graphsurg as gs

    from ._demo import surgery_api

    operate, failed_exc = surgery_api()
    plan_fn = getattr(gs, "plan", None)
    if operate is None:
        raise BadInputError("surgery (gs.operate) is not available in this build; use "
                            "`graphsurg diagnose` meanwhile")
    if not args.dry_run and not args.output:
        raise BadInputError("operate needs -o OUT.pt2 (or --dry-run to only show the plan)")
    if args.output and not args.output.endswith(".pt2"):
        raise BadInputError(f"-o {args.output!r}: the operated model is written as a .pt2 archive")
    _check_numbers(args)
    outputs: list[tuple[str, str | os.PathLike[str]]] = []
    if args.output and not args.dry_run:
        outputs = [("-o", args.output), ("-o (its plan)", _plan_path(Path(args.output)))]
    _check_paths([args.model, args.data], report=("--report", args.report), files=outputs)
    console = _console(args)
    model, data, loss = _load(args)
    certs = _certificates(args)
    try:
        if args.dry_run:
            if plan_fn is None:
                raise BadInputError("gs.plan is not available in this build")
            d = gs.diagnose(model, data, loss_fn=loss,
                            config=gs.DiagnoseConfig(max_batches=args.max_batches, progress=False))
            p = plan_fn(model, d, certificates=certs)
            if args.json:
                print(p.to_json())
            else:
                console.result(d.summary())
                console.result(p.summary())
            return EXIT_OK
        result = operate(model, data, loss_fn=loss, certificates=certs,
                         config=gs.DiagnoseConfig(max_batches=args.max_batches,
                                                  progress=False if args.quiet else None))
    except Exception as e:
        if failed_exc is not None and isinstance(e, failed_exc):
            print(f"graphsurg: surgery failed: {first_line(e)}", file=sys.stderr)
            return EXIT_CERTIFICATES
        raise
    out = Path(args.output)
    plan_path = _plan_path(out)
    _save_pt2(result.model, data[0], out, plan=(plan_path, result.plan.to_json(indent=2)))
    if args.json:
        print(result.to_json())
    else:
        console.result(result.summary())
        console.result(f"operated model: {out.resolve()}\nplan: {plan_path.resolve()}")
    if args.report:
        from ._demo import _json_of, _plan_rows
        from ._report import ModelReport, Report

        after = result.after if isinstance(result.after, gs.Diagnosis) else None
        rep = Report(title=f"graphsurg surgery: {args.model}", models=[ModelReport(
            name=Path(args.model).name, description=args.model, before=result.before, after=after,
            plan=_plan_rows(result), surgery=_json_of(result))], meta={"version": gs.__version__})
        html_path, _ = rep.write(args.report)
        console.result(f"report: {html_path.resolve()}")
        _say_missing_figures(console)
    return EXIT_CERTIFICATES if getattr(result, "rolled_back", None) else EXIT_OK


def _certificates(args: argparse.Namespace) -> Any:
    import graphsurg as gs

    changes: dict[str, Any] = {}
    if args.max_output_change is not None:
        changes["max_output_change"] = args.max_output_change
    if args.max_loss_increase is not None:
        changes["max_loss_increase"] = args.max_loss_increase
    if args.exact_only:
        changes["require_exact"] = True
    try:
        return gs.Certificates(**changes)
    except ValueError as e:
        raise BadInputError(str(e)) from None


def _plan_path(out: Path) -> Path:
    return out.with_suffix(".plan.json")


@contextlib.contextmanager
def _torch_quiet() -> Iterator[None]:
    """Silence torch's logged warnings, what it prints on stderr (a failed export prints the
    whole graph) and Python warnings for the block; the one-line error that follows says what
    failed (--debug shows the traceback)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _save_pt2(model: Any, batch: Any, out: Path, *, plan: tuple[Path, str] | None = None) -> None:
    """Export ``model`` on one batch and write the archive (and the plan, when given)
    atomically: both files or neither."""
    import torch

    from ._data import default_input_fn
    from ._files import atomic_outputs

    args_, kwargs = default_input_fn(batch)
    model.eval()
    try:
        with _torch_quiet():
            try:  # a dynamic batch dimension when the inputs allow it, else the batch's shapes
                dyn = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim()
                            else None for a in args_)
                ep = torch.export.export(model, tuple(args_), kwargs,
                                         dynamic_shapes=None if kwargs else dyn)
            except Exception:
                ep = torch.export.export(model, tuple(args_), kwargs)
    except Exception as e:
        raise GraphsurgError(f"the operated model could not be exported with torch.export "
                             f"({type(e).__name__}: {first_line(e)})") from e
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    paths = [out] + ([plan[0]] if plan else [])
    with atomic_outputs(*paths) as tmps:
        tmps[0].write_bytes(buf.getvalue())
        if plan:
            tmps[1].write_text(plan[1], encoding="utf-8")


# -- entry point ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (never raises except SystemExit from --help)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_BAD_INPUT
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    debug = bool(getattr(args, "debug", False))
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            print(f"graphsurg: error: --threads must be >= 1, got {threads}", file=sys.stderr)
            return EXIT_BAD_INPUT
        import torch

        torch.set_num_threads(threads)
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
    from ._console import progress_enabled

    try:  # --quiet and --json silence every progress bar, wherever it is opened
        with progress_enabled(False if args.quiet or getattr(args, "json", False) else None):
            return int(args.func(args))
    except KeyboardInterrupt:
        print("graphsurg: interrupted", file=sys.stderr)
        return 130
    except (BadInputError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if debug:
            raise
        print(f"graphsurg: error: {first_line(e, 400)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GraphsurgError as e:
        if debug:
            raise
        print(f"graphsurg: error: {first_line(e, 400)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        if debug:
            raise
        print(f"graphsurg: internal error: {type(e).__name__}: {first_line(e, 300)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


__all__ = ["EXIT_BAD_INPUT", "EXIT_CERTIFICATES", "EXIT_INTERNAL", "EXIT_OK", "build_parser",
           "main"]
