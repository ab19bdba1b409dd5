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
    "timestep_analysis": (
        "flows.analysis",
        "timestep_analysis_flow",
        "activity profiles, peaks and ranked dataset examples per channel",
    ),
    "concept_search": (
        "flows.concept_search",
        "concept_search_flow",
        "rank channels and SAE features by a contrastive score for each concept (phrases or prompts)",
    ),
    "plots": ("flows.plots", "plots_flow", "an activity plot per active channel"),
    "prior": ("flows.prior", "prior_flow", "steered generations from the empty prompt, per channel"),
    "heatmaps": (
        "flows.heatmaps",
        "heatmaps_flow",
        "spatial maps of each channel's top examples (and priors) at its peaks, drawn over the images",
    ),
    "deep_dream": ("flows.deep_dream", "deep_dream_flow", "optimise the input that excites each channel most"),
    "representation": (
        "flows.representation",
        "representation_flow",
        "the per-channel index the inspector reads (profiles, examples, priors, deep dreams)",
    ),
}
# Every stage at demo size on the shipped toy-shapes model (it draws at guidance 2): a few minutes on a
# laptop CPU. Priors and dreams for the first channels only.
DEMO_OVERRIDES = [
    "data_root=./ddr-data",
    "experiment_name=demo",
    "model=toy-shapes",
    "sae=toy-shapes-topk",
    "stages.capture.prompt_dataset=toy-shapes",
    "guidance_scale=2",
    "num_inference_steps=20",
    "stages.capture.samples_per_shard=50",
    "stages.capture.batch_size=25",
    "stages.timestep_analysis.top_k=8",
    "stages.concept_search.concepts=[red background, circle]",
    "stages.prior.end_channel=8",
    "stages.prior.steer_strength_scale=1000",  # toy-shapes' raw channels need a stronger push than SD's 50
    "stages.prior.n_results=3",
    "stages.prior.channels_per_batch=8",
    "stages.deep_dream.end_channel=4",
    "stages.deep_dream.n_results=2",
    "stages.deep_dream.num_steps=30",
    "stages.deep_dream.timesteps=[activity_peaks]",
    "stages.deep_dream.use_just_one_timestep=true",
    "stages.deep_dream.intermediate_opt_results_every_n_steps=10",
]


def _flow(stage: str) -> Any:
    module, name, _ = STAGES[stage]
    return getattr(importlib.import_module(module), name)


STAGES["pipeline"] = ("flows.pipeline", "pipeline_flow", "every stage in order, in one Prefect run")


def run_stage(stage: str, overrides: list[str], config_file: str | None = None) -> Any:
    from ddr.config import load_config

    load_config(overrides, None if config_file is None else Path(config_file))
    return _flow(stage)(overrides=overrides, config_file=config_file)


def demo(overrides: list[str]) -> None:
    """Every stage on the shipped toy-shapes model into ./ddr-data; prints where the results are."""
    from ddr.config import load_config
    from ddr.stores import ExperimentLayout
    from ddr.tracking import tracking_uri
    from flows.pipeline import pipeline_flow

    overrides = [*DEMO_OVERRIDES, *overrides]
    config = load_config(overrides)
    results = pipeline_flow(overrides=overrides)
    layout = ExperimentLayout(config.experiment_dir.resolve())
    print("\nddr demo finished.")
    print(f"  experiment folder: {layout.root}")
    print(f"  capture store:     {results['capture']['store']}")
    run = config.stages.deep_dream.run_name
    for kind in config.kinds:
        print(f"  {kind} analysis:      {layout.analysis_store(kind)}")
        print(f"  {kind} plots:         {layout.plots_dir(kind)}")
        print(f"  {kind} heatmaps:      {layout.heatmap_store(kind)}")
        print(f"  {kind} priors:        {layout.prior_store(kind)}")
        print(f"  {kind} deep dreams:   {layout.dream_store(run, kind)}")
    print(f"  representation:    {layout.representation_dir}")
    print(f"  concept search:    {layout.root / 'concepts'}")
    print(f"  MLflow store:      {tracking_uri(config)}")
    print(f"  browse MLflow:     .venv/bin/mlflow ui --backend-store-uri {tracking_uri(config)}")
    where = f"data_root={config.data_root} experiment_name={config.experiment_name}"
    print(f"  inspect:           .venv/bin/ddr inspect {where}")
    print(f"  notebooks:         DDR_DATA_ROOT={config.data_root.resolve()} DDR_EXPERIMENT={config.experiment_name}")


def inspect(overrides: list[str], host: str, port: int, config_file: str | None = None) -> int:
    """Start the Streamlit inspector on the experiment's representation (bound to `host`, loopback by default)."""
    import os

    from ddr.config import load_config
    from ddr.inspector import inspector_command

    config = load_config(overrides, None if config_file is None else Path(config_file))
    if not (config.experiment_dir / "representation").is_dir():
        print(
            f"ddr: no representation in {config.experiment_dir} yet; the inspector will say what is missing "
            "(run `ddr run representation` first)",
            file=sys.stderr,
        )
    command = inspector_command(config.experiment_dir, host, port)
    print(f"ddr inspect: http://{host}:{port}  ({config.experiment_dir.resolve()})", flush=True)
    os.execv(command[0], command)  # the inspector replaces this process: signals reach Streamlit directly
    return 0


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
    run.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="deep_dream only: a grid axis (repeatable); one nested MLflow run per combination",
    )
    demo_parser = commands.add_parser("demo", help="run every stage on the shipped toy-shapes model into ./ddr-data")
    demo_parser.add_argument("overrides", nargs="*")
    commands.add_parser("stages", help="list the stages")
    inspect_parser = commands.add_parser("inspect", help="browse the representation in the Streamlit inspector")
    inspect_parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (data_root, experiment_name)")
    inspect_parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    inspect_parser.add_argument("--port", type=int, default=8501)
    inspect_parser.add_argument("--config", help="a base config YAML instead of configs/config.yaml")
    from ddr.toy.cli import add_train_sae, add_train_toy

    add_train_toy(commands.add_parser("train-toy", help="train the toy-shapes model (CPU, 1 thread: 15-30 minutes)"))
    add_train_sae(commands.add_parser("train-sae", help="train a TopK SAE on a layer's per-token activations"))
    args = parser.parse_args(argv)

    from ddr.config import ConfigError, load_config

    try:
        if args.command == "stages":
            print(stage_help)
        elif args.command == "demo":
            demo(args.overrides)
        elif args.command == "inspect":
            return inspect(args.overrides, args.host, args.port, args.config)
        elif args.command in ("train-toy", "train-sae"):
            from ddr.toy.cli import run_train_sae, run_train_toy

            (run_train_toy if args.command == "train-toy" else run_train_sae)(args)
        elif args.sweep:
            if args.stage != "deep_dream":
                raise ConfigError(f"--sweep is for the deep_dream stage, not {args.stage!r}")
            from flows.deep_dream import deep_dream_sweep_flow

            load_config(args.overrides, None if args.config is None else Path(args.config))
            result = deep_dream_sweep_flow(grid=args.sweep, overrides=args.overrides, config_file=args.config)
            print(json.dumps(result, indent=1, default=str))
        else:
            result = run_stage(args.stage, args.overrides, args.config)
            print(json.dumps(result, indent=1, default=str))
    except ConfigError as error:
        print(f"ddr: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
