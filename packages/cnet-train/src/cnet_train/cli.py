"""The `cnet-train` console script: launch, config, demo, embed, export.

Only argparse is imported at module level, so `cnet-train --help` is instant; each command
imports what it needs. Config errors are reported before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnet_train.config import TrainConfig


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cnet-train {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnet-train", description="Train ControlNets for SD 1.5, 2.1 and SDXL."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    launch = commands.add_parser("launch", help="train as CONFIG says (resumes by default)")
    _config_args(launch)
    launch.set_defaults(run=_launch)

    show = commands.add_parser("config", help="print the resolved config")
    _config_args(show)
    show.set_defaults(run=_show)

    demo = commands.add_parser("demo", help="tiny offline end-to-end run on CPU")
    demo.add_argument("--out", type=Path, default=Path("demo-run"), help="output folder")
    demo.add_argument("--family", choices=["sd15", "sd21", "sdxl"], default="sd15")
    demo.add_argument("--steps", type=int, default=150, help="optimizer steps")
    demo.add_argument("--samples", type=int, default=48, help="generated samples")
    demo.set_defaults(run=_demo)

    embed = commands.add_parser("embed", help="build the text-embedding cache of CONFIG")
    _config_args(embed)
    embed.set_defaults(run=_embed)

    export = commands.add_parser("export", help="checkpoint to diffusers ControlNet folder(s)")
    export.add_argument("checkpoint", type=Path, help="a Lightning, DeepSpeed or FSDP checkpoint")
    export.add_argument("out", type=Path, help="folder to write controlnet/ (and controlnet_ema/)")
    export.set_defaults(run=_export)
    return parser


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="the run's YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.lr=1e-5 (repeatable)",
    )


def _load(args: argparse.Namespace) -> TrainConfig:
    from cnet_train.config_io import load_config

    return load_config(args.config, args.overrides)


def _launch(args: argparse.Namespace) -> int:
    from cnet_train.trainer import RankFailedError, fit

    config = _load(args)
    try:
        fit(config)
    except RankFailedError as exc:
        print(f"cnet-train launch: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _show(args: argparse.Namespace) -> int:
    from cnet_train.config_io import dump_config

    config = _load(args)
    print(dump_config(config), end="")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cnet_train.demo import run_demo

    run_demo(args.out, args.family, steps=args.steps, samples=args.samples)
    return 0


def _embed(args: argparse.Namespace) -> int:
    from cnet_train.embed import embed_captions

    config = _load(args)
    embed_captions(config)
    return 0


def _export(args: argparse.Namespace) -> int:
    from cnet_train.export import export_checkpoint

    for path in export_checkpoint(args.checkpoint, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
