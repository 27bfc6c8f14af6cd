"""The `cnet-data` console script: index, buckets, check and demo.

Only argparse (and the light error module) is imported at module level: `cnet-data --help`
answers without loading torch, numpy or Pillow. Each command imports what it needs when it runs.
Every failure goes through `cnet_data.errors.run_reporting`: one `cnet-data COMMAND: error: ...`
line and a hint, the traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cnet_data.errors import run_reporting

if TYPE_CHECKING:
    from cnet_data.index import IndexBuilder
    from cnet_data.scan import BadSamplesError, ScanReport


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def run() -> int:
        code: int = args.run(args)
        return code

    return run_reporting(f"cnet-data {args.command}", run, debug=args.debug)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnet-data",
        description="Index, check and inspect ControlNet training datasets.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = commands.add_parser("index", help="scan a source, validate it, write the index")
    _add_source_args(index)
    index.add_argument("--out", type=Path, required=True, help="index directory to write")
    index.add_argument(
        "--report", type=Path, help="bad-sample report (JSON); default: OUT.report.json"
    )
    _add_debug_arg(index)
    index.set_defaults(run=_run_index)

    check = commands.add_parser("check", help="validate a source only; JSON report")
    _add_source_args(check)
    check.add_argument("--report", type=Path, help="write the report here instead of stdout")
    _add_debug_arg(check)
    check.set_defaults(run=_run_check)

    buckets = commands.add_parser("buckets", help="bucket table and histogram of an index")
    buckets.add_argument("index", type=Path, help="index directory")
    _add_bucket_args(buckets)
    buckets.add_argument("--png", type=Path, help="write a histogram PNG here")
    _add_debug_arg(buckets)
    buckets.set_defaults(run=_run_buckets)

    demo = commands.add_parser("demo", help="generate a small dataset, index it, draw batches")
    demo.add_argument("--out", type=Path, default=Path("demo-run"), help="output directory")
    demo.add_argument("--samples", type=int, default=48, help="samples to generate")
    _add_debug_arg(demo)
    demo.set_defaults(run=_run_demo)
    return parser


_DEBUG_HELP = "print the traceback of an error, not just its message"


def _add_debug_arg(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the command it sets the flag; absent, the global default stands.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="JSONL manifest, prompt.json, or folder of pairs")
    p.add_argument("--format", choices=["jsonl", "folder", "prompt_json"], help="source layout")
    p.add_argument("--image-key", default="image", help="JSONL key of the image path")
    p.add_argument(
        "--conditioning-key", default="conditioning_image", help="JSONL key of the condition"
    )
    p.add_argument("--caption-key", default="text", help="JSONL key of the caption")
    p.add_argument(
        "--on-bad",
        choices=["skip", "fail"],
        default="fail",
        help="skip bad samples (counted and listed) or fail (the default)",
    )
    p.add_argument(
        "--verify",
        choices=["header", "decode"],
        default="header",
        help="header: sizes from headers plus a completeness check; decode: decode everything",
    )
    p.add_argument("--max-pixels", type=int, help="reject larger images (decompression bombs)")
    p.add_argument("--workers", type=int, default=0, help="probe processes (0: one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_bucket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--area", type=int, default=1024 * 1024, help="target pixel area")
    p.add_argument("--min-side", type=int, default=512)
    p.add_argument("--max-side", type=int, default=2048)
    p.add_argument("--step", type=int, default=64)
    p.add_argument(
        "--global-batch",
        type=int,
        default=0,
        help="show how buckets smaller than this global batch size would be merged",
    )


def _scan_from_args(
    args: argparse.Namespace,
) -> tuple[IndexBuilder, ScanReport] | BadSamplesError:
    from cnet_data.imageio import DEFAULT_MAX_PIXELS
    from cnet_data.scan import BadSamplesError, ScanConfig, scan
    from cnet_data.sources import SourceConfig

    source = SourceConfig(
        path=args.source,
        format=args.format,
        image_key=args.image_key,
        conditioning_key=args.conditioning_key,
        caption_key=args.caption_key,
    )
    config = ScanConfig(
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        verify=args.verify,
        on_bad=args.on_bad,
        workers=args.workers,
    )
    try:
        return scan(source, config, progress=not args.quiet)
    except BadSamplesError as exc:
        return exc


def _run_index(args: argparse.Namespace) -> int:
    from cnet_data.scan import BadSamplesError

    report_path = args.report or args.out.with_name(args.out.name + ".report.json")
    _claim_outputs(args.out, report_path)
    outcome = _scan_from_args(args)
    if isinstance(outcome, BadSamplesError):
        outcome.report.write(report_path)
        print(f"report: {report_path}", file=sys.stderr)
        raise outcome
    builder, report = outcome
    builder.write(args.out, root=_root_of(args), extra={"scan": report.totals()})
    report.write(report_path)
    print(f"{report.summary()}\nindex: {args.out}\nreport: {report_path}")
    return 0


def _claim_outputs(index: Path, report: Path) -> None:
    """Refuse a bad --out or --report before a scan that may take hours, not after it."""
    from cnet_data.index import INDEX_OWNERSHIP
    from cnet_data.outdir import claim_directory
    from cnet_data.scan import ScanReport

    claim_directory(index, INDEX_OWNERSHIP)
    ScanReport.claim(report)


def _root_of(args: argparse.Namespace) -> Path:
    from cnet_data.sources import SourceConfig

    return SourceConfig(path=args.source, format=args.format).root


def _run_check(args: argparse.Namespace) -> int:
    import json

    from cnet_data.scan import BadSamplesError

    outcome = _scan_from_args(args)
    report = outcome.report if isinstance(outcome, BadSamplesError) else outcome[1]
    if args.report:
        report.write(args.report)
        print(report.summary(), file=sys.stderr)
    else:
        print(json.dumps(report.to_json(), indent=2))
    if isinstance(outcome, BadSamplesError):
        raise outcome  # reported as one line and a hint, exit 1, after the report is out
    return 0


def _run_buckets(args: argparse.Namespace) -> int:
    from cnet_data.bucket_report import bucket_rows, format_table, write_histogram
    from cnet_data.buckets import BucketConfig, BucketTable
    from cnet_data.index import DatasetIndex

    index = DatasetIndex(args.index)
    table = BucketTable.from_config(
        BucketConfig(area=args.area, min_side=args.min_side, max_side=args.max_side, step=args.step)
    )
    rows = bucket_rows(index, table, global_batch=args.global_batch)
    print(format_table(rows))
    if args.png:
        write_histogram(rows, args.png)
        print(f"histogram: {args.png}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from cnet_data.demo import run_demo

    run_demo(args.out, samples=args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
