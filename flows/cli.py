"""The `ddr` command: run a stage (as its Prefect flow), the demo, or the inspector."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

STAGES: dict[str, tuple[str, str, str]] = {
    "provision": ("flows.provision", "provision_flow", "download, copy or generate models, SAEs and prompts"),
    "capture": ("flows.capture", "capture_flow", "generate images and record the layer's activations"),
}
DEMO_OVERRIDES = [
    "data_root=./ddr-data",
    "experiment_name=demo",
    "num_inference_steps=20",
    "stages.capture.samples_per_shard=6",
    "stages.capture.batch_size=3",
]


def _flow(stage: str) -> Any:
    module, name, _ = STAGES[stage]
    return getattr(importlib.import_module(module), name)


def run_stage(stage: str, overrides: list[str], config_file: str | None = None) -> Any:
    from ddr.config import load_config

    load_config(overrides, None if config_file is None else Path(config_file))
    return _flow(stage)(overrides=overrides, config_file=config_file)


def demo(overrides: list[str]) -> None:
    """Every stage that exists, on the embedded model, into ./ddr-data; prints where the results are."""
    from ddr.config import load_config
    from ddr.tracking import tracking_uri

    overrides = [*DEMO_OVERRIDES, *overrides]
    config = load_config(overrides)
    results = {stage: run_stage(stage, overrides) for stage in STAGES}
    print("\nddr demo finished.")
    print(f"  experiment folder: {config.experiment_dir.resolve()}")
    print(f"  capture store:     {results['capture']['store']}")
    print(f"  MLflow store:      {tracking_uri(config)}  (mlflow ui --backend-store-uri {tracking_uri(config)})")


def main(argv: list[str] | None = None) -> int:
    stage_help = "\n".join(f"  {name:<18} {doc}" for name, (_, _, doc) in STAGES.items())
    parser = argparse.ArgumentParser(
        prog="ddr",
        description="Deep dreams and activity profiles of Stable Diffusion UNet channels and SAE features.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"stages:\n{stage_help}\n\noverrides are dotted key=value pairs, e.g. "
        "stages.capture.num_images_per_prompt=2 model=sd-v1-4 infrastructure=local",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one stage as its Prefect flow")
    run.add_argument("stage", choices=list(STAGES))
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    run.add_argument("--config", help="a base config YAML instead of configs/config.yaml")
    demo_parser = commands.add_parser("demo", help="run every stage on the embedded model into ./ddr-data")
    demo_parser.add_argument("overrides", nargs="*")
    commands.add_parser("stages", help="list the stages")
    args = parser.parse_args(argv)

    from ddr.config import ConfigError

    try:
        if args.command == "stages":
            print(stage_help)
        elif args.command == "demo":
            demo(args.overrides)
        else:
            result = run_stage(args.stage, args.overrides, args.config)
            print(json.dumps(result, indent=1, default=str))
    except ConfigError as error:
        print(f"ddr: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
