"""The `cnet-data` console script: index, buckets, check and demo.

Only argparse (and the light error module) is imported at module level: `cnet-data --help`
answers without loading torch, numpy or Pillow. Each command imports what it needs when it runs.
Every failure goes through `cnet_data.errors.run_reporting`: one `cnet-data COMMAND: error: ...`
line and a hint, the traceback only with `--debug`.

`index`, `check` and `buckets` also read their settings from a training config (`--config
RUN.yaml`, see `cnet_data.run_config`). Flag defaults are None here so that a flag the user
typed can be told from one left out: typed flags win over the file, the file over the defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from cnet_data.errors import CnetError, run_reporting
from cnet_data.sources import SourceFormat

if TYPE_CHECKING:
    from cnet_data.buckets import BucketConfig
    from cnet_data.index import IndexBuilder
    from cnet_data.run_config import RunDataConfig
    from cnet_data.scan import BadSamplesError, ScanConfig, ScanReport
    from cnet_data.sources import SourceConfig


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

    index = _command(commands, "index", "scan a source, validate it, write the index")
    _add_source_args(index)
    index.add_argument(
        "--out", type=Path, help="index directory to write (with --config: data.index)"
    )
    index.add_argument(
        "--report", type=Path, help="bad-sample report (JSON); default: OUT.report.json"
    )
    _add_debug_arg(index)
    index.set_defaults(run=_run_index)

    check = _command(commands, "check", "validate a source only; JSON report")
    _add_source_args(check)
    check.add_argument("--report", type=Path, help="write the report here instead of stdout")
    _add_debug_arg(check)
    check.set_defaults(run=_run_check)

    buckets = _command(commands, "buckets", "bucket table and histogram of an index")
    buckets.add_argument(
        "index", type=Path, nargs="?", help="index directory (with --config: data.index)"
    )
    _add_config_arg(buckets)
    _add_bucket_args(buckets)
    buckets.add_argument("--png", type=Path, help="write a histogram PNG here")
    _add_debug_arg(buckets)
    buckets.set_defaults(run=_run_buckets)

    _add_condition_command(commands)

    demo = commands.add_parser("demo", help="generate a small dataset, index it, draw batches")
    demo.add_argument("--out", type=Path, default=Path("demo-run"), help="output directory")
    demo.add_argument("--samples", type=int, default=48, help="samples to generate")
    _add_debug_arg(demo)
    demo.set_defaults(run=_run_demo)
    return parser


def _add_condition_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`cnet-data condition` and its arguments (no --config: it writes a dataset, not an index)."""
    from cnet_data.condition_methods import METHODS

    condition = commands.add_parser(
        "condition", help="make conditioning images (Canny, HED, depth, ...) for a set of images"
    )
    condition.add_argument(
        "images",
        type=Path,
        help="folder of images (captions: x.txt by x.jpg), JSONL manifest, or Hugging Face "
        "dataset (parquet/arrow)",
    )
    condition.add_argument(
        "--out", type=Path, required=True, help="dataset folder to write (images/, conditioning/)"
    )
    condition.add_argument(
        "--format", choices=["folder", "jsonl", "prompt_json", "hf"], help="input layout"
    )
    condition.add_argument("--image-key", help="JSONL key or column of the image (image)")
    condition.add_argument("--caption-key", help="JSONL key or column of the caption (text)")
    condition.add_argument("--split", help="hf: the split to read (default: train)")
    condition.add_argument(
        "--method",
        choices=METHODS,
        default="canny",
        help="what to draw: canny (OpenCV), or a controlnet_aux detector (installed apart)",
    )
    condition.add_argument("--low", type=_at_least(0), default=100, help="Canny low threshold")
    condition.add_argument("--high", type=_at_least(0), default=200, help="Canny high threshold")
    condition.add_argument(
        "--annotators",
        default="lllyasviel/Annotators",
        help="controlnet_aux methods: the detectors' weights (hub repository or local folder)",
    )
    condition.add_argument(
        "--workers",
        type=_at_least(0),
        default=0,
        help="processes (default: one per core; 1 for a controlnet_aux method)",
    )
    condition.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_debug_arg(condition)
    condition.set_defaults(run=_run_condition)


_DEBUG_HELP = "print the traceback of an error, not just its message"
_PRECEDENCE = """\
settings: a flag given on the command line wins over --config RUN.yaml, which wins over the
defaults. With --config the source, manifest keys and scan settings come from the config's
data.source and data.scan (left out, data.scan is cnet-train's default: on_bad skip), the
index folder from data.index (default RUN_DIR/index), relative paths from the YAML file's
folder (those of flags from the current one), and the buckets from data.buckets; bucket
fields the config leaves out follow the model family (model.family, or the local model
folder's unet/config.json): sd15 512x512, sd21 768x768 (512 variant: 512x512), sdxl
1024x1024, with sides from half to twice that. Without a known family: 1024x1024, 512..2048.
"""


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=help,
        description=help,
        epilog=_PRECEDENCE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        metavar="RUN.yaml",
        help="read the settings from this training config (the one cnet-train launch reads)",
    )


def _add_debug_arg(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: given after the command it sets the flag; absent, the global default stands.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        type=Path,
        nargs="?",
        help="JSONL manifest, prompt.json, folder of pairs, tar shard(s), or a Hugging Face "
        "dataset's parquet/arrow files; with --url, the local folder kept for the dataset "
        "(with --config: data.source.path)",
    )
    _add_config_arg(p)
    p.add_argument("--format", choices=list(get_args(SourceFormat)), help="source layout")
    p.add_argument("--image-key", help="JSONL key or column of the image (default: image)")
    p.add_argument(
        "--conditioning-key",
        help="JSONL key or column of the condition (default: conditioning_image)",
    )
    p.add_argument("--caption-key", help="JSONL key or column of the caption (default: text)")
    p.add_argument("--split", help="hf: the split to read (default: train)")
    p.add_argument(
        "--url",
        help="tar shards at an fsspec URL (s3://bucket/shards) or a hub dataset "
        "(hf://datasets/OWNER/NAME)",
    )
    p.add_argument(
        "--read-cache-gib",
        type=float,
        help="--url tar shards: bound of the local read-through cache under SOURCE (default 0: "
        "none)",
    )
    p.add_argument(
        "--conditioning-extension",
        help="tar shards: extension of the conditioning member (default: cond.png, KEY.cond.png)",
    )
    p.add_argument(
        "--on-bad",
        choices=["skip", "fail"],
        help="skip bad samples (counted and listed) or fail (the default without --config)",
    )
    p.add_argument(
        "--verify",
        choices=["header", "decode", "metadata"],  # scan.ScanVerify, kept light here
        help="header (the default): sizes from headers plus a completeness check; "
        "decode: decode everything; metadata: sizes the source records (tar KEY.json), "
        "else as header",
    )
    p.add_argument(
        "--max-pixels", type=_at_least(1), help="reject larger images (decompression bombs)"
    )
    p.add_argument(
        "--workers", type=_at_least(0), help="probe processes (0, the default: one per core)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_bucket_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--area", type=_at_least(1), help="target pixel area (see settings below)")
    p.add_argument("--min-side", type=_at_least(1), help="smallest side (see settings below)")
    p.add_argument("--max-side", type=_at_least(1), help="largest side (see settings below)")
    p.add_argument("--step", type=_at_least(1), help="sides are multiples of this (default: 64)")
    p.add_argument(
        "--global-batch",
        type=int,
        default=0,
        help="show how buckets smaller than this global batch size would be merged",
    )


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # what argparse calls the type in its error message
    return parse


_SOURCE_FLAGS = (
    "format",
    "image_key",
    "conditioning_key",
    "caption_key",
    "conditioning_extension",
    "split",
    "url",
    "read_cache_gib",
)
_SCAN_FLAGS = ("max_pixels", "verify", "on_bad", "workers")
_BUCKET_FLAGS = ("area", "min_side", "max_side", "step")


class MissingSettingError(CnetError):
    """A command has neither the flag nor a config value for something it needs."""

    exit_code = 2


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The flags among `names` typed on the command line (argparse leaves the others None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _run_config(args: argparse.Namespace) -> RunDataConfig | None:
    from cnet_data.run_config import load_run_config

    return load_run_config(args.config) if args.config is not None else None


def _source_and_scan(
    args: argparse.Namespace, run: RunDataConfig | None
) -> tuple[SourceConfig, ScanConfig]:
    """The source and scan settings: flags over the config's over the defaults."""
    import attrs

    from cnet_data.scan import ScanConfig
    from cnet_data.sources import SourceConfig

    source_flags = _given(args, _SOURCE_FLAGS)
    if args.source is not None:
        source_flags["path"] = args.source
    scan_flags = _given(args, _SCAN_FLAGS)
    if run is not None:
        source = attrs.evolve(run.source, **source_flags)
        scan_config = attrs.evolve(run.scan, **scan_flags)
        print(
            f"config {run.file}: source {source.path}, on_bad {scan_config.on_bad}",
            file=sys.stderr,
        )
        return source, scan_config
    if args.source is None:
        raise MissingSettingError(
            "no dataset source given",
            hint="give SOURCE (a JSONL manifest, prompt.json or folder of pairs) "
            "or --config RUN.yaml",
        )
    return SourceConfig(**source_flags), ScanConfig(**scan_flags)


def _scan(
    source: SourceConfig, config: ScanConfig, *, quiet: bool
) -> tuple[IndexBuilder, ScanReport] | BadSamplesError:
    from cnet_data.scan import BadSamplesError, scan

    try:
        return scan(source, config, progress=not quiet)
    except BadSamplesError as exc:
        return exc


def _index_dir(given: Path | None, run: RunDataConfig | None, flag: str) -> Path:
    """The index folder: the flag, else the config's data.index (or RUN_DIR/index)."""
    if given is not None:
        return given
    if run is not None and run.index is not None:
        return run.index
    where = f"config {run.file} sets neither data.index nor run_dir" if run else "none given"
    raise MissingSettingError(
        f"no index folder: {where}", hint=f"give {flag}, or --config RUN.yaml with run_dir"
    )


def _run_condition(args: argparse.Namespace) -> int:
    from cnet_data.condition import condition_folder
    from cnet_data.condition_methods import AuxConfig, CannyConfig, MethodConfig
    from cnet_data.sources import SourceConfig

    keys = _given(args, ("format", "image_key", "caption_key", "split"))
    method: MethodConfig = (
        CannyConfig(low=args.low, high=args.high)
        if args.method == "canny"
        else AuxConfig(args.method, args.annotators)
    )
    report = condition_folder(
        SourceConfig(args.images, **keys),
        args.out,
        method,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(
        f"conditioning: {report.written} written, {report.skipped} already there, "
        f"{len(report.failed)} unreadable"
    )
    for image, reason in report.failed:
        print(f"  {image}: {reason}")
    print(f"index it with: cnet-data index {args.out} --out {args.out}-index")
    return 1 if report.failed else 0


def _run_index(args: argparse.Namespace) -> int:
    from cnet_data.scan import BadSamplesError

    run = _run_config(args)
    out = _index_dir(args.out, run, "--out DIR")
    source, scan_config = _source_and_scan(args, run)
    report_path = args.report or out.with_name(out.name + ".report.json")
    _claim_outputs(out, report_path)
    outcome = _scan(source, scan_config, quiet=args.quiet)
    if isinstance(outcome, BadSamplesError):
        outcome.report.write(report_path)
        print(f"report: {report_path}", file=sys.stderr)
        raise outcome
    builder, report = outcome
    builder.write(out, root=source.root, extra={"scan": report.totals()})
    report.write(report_path)
    print(f"{report.summary()}\nindex: {out}\nreport: {report_path}")
    return 0


def _claim_outputs(index: Path, report: Path) -> None:
    """Refuse a bad --out or --report before a scan that may take hours, not after it."""
    from cnet_data.index import INDEX_OWNERSHIP
    from cnet_data.outdir import claim_directory
    from cnet_data.scan import ScanReport

    claim_directory(index, INDEX_OWNERSHIP)
    ScanReport.claim(report)


def _run_check(args: argparse.Namespace) -> int:
    import json

    from cnet_data.scan import BadSamplesError

    source, scan_config = _source_and_scan(args, _run_config(args))
    outcome = _scan(source, scan_config, quiet=args.quiet)
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
    from cnet_data.buckets import BucketTable
    from cnet_data.index import DatasetIndex

    run = _run_config(args)
    index = DatasetIndex(_index_dir(args.index, run, "INDEX"))
    config, origin = _bucket_config(args, run)
    table = BucketTable.from_config(config)
    rows = bucket_rows(index, table, global_batch=args.global_batch)
    print(f"{origin}; sides {config.min_side}..{config.max_side}, step {config.step}")
    print(format_table(rows))
    if args.png:
        write_histogram(rows, args.png)
        print(f"histogram: {args.png}")
    return 0


def _bucket_config(args: argparse.Namespace, run: RunDataConfig | None) -> tuple[BucketConfig, str]:
    """The bucket settings (flags over data.buckets over the family's defaults over
    BucketConfig's) and a line saying where the area came from."""
    from cnet_data.run_config import bucket_config

    flags = _given(args, _BUCKET_FLAGS)
    given = {**(run.buckets if run is not None else {}), **flags}
    return bucket_config(given, run.family if run else None, flags=list(flags))


def _run_demo(args: argparse.Namespace) -> int:
    from cnet_data.demo import run_demo

    run_demo(args.out, samples=args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
