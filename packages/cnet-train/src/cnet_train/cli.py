"""The `cnet-train` console script: launch, config, plan, demo, embed, encode, export,
evaluate.

Only argparse is imported at module level, so `cnet-train --help` is instant; each command
imports what it needs. Every failure goes through `cnet_data.errors.run_reporting`: one
`cnet-train COMMAND: error: ...` line (and a `hint:`), the traceback only with `--debug`. A
config is checked, keys and values first and then against this machine (`preflight`), before
any model, dataset or training code is imported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnet_train.config import TrainConfig
    from cnet_train.preflight import Command


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command `argv` asks for; its exit code (2 for a bad config or bad input)."""
    from cnet_data.errors import run_reporting

    args = _parser().parse_args(argv)
    return run_reporting(
        f"cnet-train {args.command}", lambda: int(args.run(args)), debug=args.debug
    )


def _parser() -> argparse.ArgumentParser:
    from cnet_models.families import FAMILY_NAMES  # names only: no torch, no diffusers

    parser = argparse.ArgumentParser(
        prog="cnet-train", description="Train ControlNets for SD 1.5, 2.1 and SDXL."
    )
    _debug_arg(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    launch = commands.add_parser("launch", help="train as CONFIG says (resumes by default)")
    _config_args(launch)
    launch.set_defaults(run=_launch)

    show = commands.add_parser("config", help="check CONFIG and print it resolved")
    _config_args(show)
    show.add_argument(
        "--schema-only",
        action="store_true",
        help="check keys, types and values only, not paths or devices (for a config "
        "written for another machine)",
    )
    show.set_defaults(run=_show)

    plan = commands.add_parser(
        "plan", help="peak memory per device of CONFIG, by component, and what makes it fit"
    )
    _config_args(plan)
    plan.add_argument(
        "--memory",
        default=None,
        help="memory per device to fit, e.g. 24GiB, 80GB or 141 (GiB); default: this "
        "machine's first GPU",
    )
    plan.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices the run spreads over (default: trainer.devices x trainer.num_nodes, "
        "or this machine's GPUs for auto)",
    )
    plan.set_defaults(run=_plan)

    demo = commands.add_parser("demo", help="tiny offline end-to-end run on CPU")
    demo.add_argument("--out", type=Path, default=Path("demo-run"), help="output folder")
    demo.add_argument("--family", choices=FAMILY_NAMES, default="sd15")
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (default 600, enough to show control)",
    )
    demo.add_argument("--samples", type=int, default=48, help="generated samples")
    demo.add_argument(
        "--random-base",
        action="store_true",
        help="train on a tiny random base model instead of the fitted, cached one: a fast "
        "plumbing check whose ControlNet cannot learn control",
    )
    demo.set_defaults(run=_demo)

    embed = commands.add_parser("embed", help="build the text-embedding cache of CONFIG")
    _config_args(embed)
    embed.set_defaults(run=_embed)

    encode = commands.add_parser(
        "encode", help="build the latent cache of CONFIG (latents.path): VAE latents per sample"
    )
    _config_args(encode)
    encode.set_defaults(run=_encode)

    export = commands.add_parser("export", help="checkpoint to diffusers ControlNet folder(s)")
    export.add_argument("checkpoint", type=Path, help="a Lightning, DeepSpeed or FSDP checkpoint")
    export.add_argument(
        "out",
        type=Path,
        help="folder to write controlnet/ (and controlnet_ema/); with --format single-file, "
        "controlnet.safetensors (and controlnet_ema.safetensors)",
    )
    export.add_argument(
        "--format",
        choices=["diffusers", "single-file"],
        default="diffusers",
        help="diffusers folders (the default), or one .safetensors per ControlNet in the "
        "original layout that A1111, Forge and ComfyUI load",
    )
    export.set_defaults(run=_export)

    evaluate = commands.add_parser(
        "evaluate", help="control gain of an export or checkpoint, overall and by timestep"
    )
    _config_args(evaluate)
    evaluate.add_argument(
        "weights",
        type=Path,
        help="an export (RUN_DIR/exports/step-N, or its controlnet/ or controlnet_ema/) or a "
        "checkpoint of any strategy",
    )
    evaluate.add_argument("--json", action="store_true", help="print the figures as JSON")
    evaluate.set_defaults(run=_evaluate)
    for sub in (launch, show, plan, demo, embed, encode, export, evaluate):
        # Also after the command (`cnet-train launch run.yaml --debug`), where people type it;
        # suppressed there so that the top-level default stands when it is not given.
        _debug_arg(sub, argparse.SUPPRESS)
    return parser


def _debug_arg(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="print the full traceback of an error too",
    )


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        type=Path,
        help="the run's YAML file (its relative paths are relative to its folder)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.lr=1e-5 (repeatable; a relative "
        "path here is relative to the current directory)",
    )


def _load(args: argparse.Namespace, command: Command, *, machine: bool = True) -> TrainConfig:
    """The checked config of `args`: keys and values, then (with `machine`) the paths and
    devices it names, so that a bad config fails in seconds, before anything heavy loads."""
    from cnet_train.config_io import load_config

    config = load_config(args.config, args.overrides)
    if machine:
        from cnet_train.preflight import preflight

        preflight(config, command, source=str(args.config), base_dir=_folder(args.config))
    return config


def _folder(config: Path) -> Path:
    return Path(config).parent.absolute()


def _launch(args: argparse.Namespace) -> int:
    config = _load(args, "launch")
    from cnet_train.trainer import fit

    # A failure of this or another rank (RankFailedError, a CnetError) reaches run_reporting.
    fit(config)
    return 0


def _show(args: argparse.Namespace) -> int:
    from cnet_train.config_io import dump_config

    config = _load(args, "config", machine=not args.schema_only)
    print(dump_config(config), end="")
    if not args.schema_only:  # the family may come from the model folder, on this machine
        from cnet_data.run_config import run_buckets

        buckets = run_buckets(config.data.buckets, config.model.described_by, config.model.family)
        print(f"# {buckets.line()}")  # a YAML comment: the output still loads as the config
    return 0


def _plan(args: argparse.Namespace) -> int:
    config = _load(args, "config", machine=False)
    from cnet_train.memory_launch import plan_command

    return plan_command(config, args.memory, args.devices)


def _demo(args: argparse.Namespace) -> int:
    from cnet_train.demo import run_demo

    run_demo(
        args.out,
        args.family,
        **({} if args.steps is None else {"steps": args.steps}),
        samples=args.samples,
        random_base=args.random_base,
    )
    return 0


def _embed(args: argparse.Namespace) -> int:
    config = _load(args, "embed")
    from cnet_train.embed import embed_captions

    embed_captions(config)
    return 0


def _encode(args: argparse.Namespace) -> int:
    config = _load(args, "encode")
    from cnet_train.encode import encode_latents

    added = encode_latents(config)
    print(f"latent cache {config.latents.path}: {added} latents added")
    return 0


def _export(args: argparse.Namespace) -> int:
    from cnet_train.export import export_checkpoint, export_single_files

    write = export_single_files if args.format == "single-file" else export_checkpoint
    for path in write(args.checkpoint, args.out):
        print(path)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    config = _load(args, "launch")
    from cnet_train.evaluate import evaluate, report

    print(report(evaluate(config, args.weights), args.weights, as_json=args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
