"""The `ddr train-toy` and `ddr train-sae` subcommands (argument parsing only; the work is imported when run)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_train_toy(parser: argparse.ArgumentParser) -> None:
    """Options of `ddr train-toy` (defaults: `ddr.toy.train.ToyTrainConfig`)."""
    parser.add_argument("--output", default="assets/toy-shapes", help="pipeline folder to write (replaced)")
    parser.add_argument("--steps", type=int, default=None, help="UNet + text-encoder steps (default 3000)")
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default 2000)")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: fastest here)")
    parser.add_argument("--samples", type=int, default=None, help="training images (default 6000)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32")
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_train_sae(parser: argparse.ArgumentParser) -> None:
    """Options of `ddr train-sae` (defaults: `ddr.toy.train_sae.SaeTrainConfig`), then config overrides."""
    parser.add_argument("--output", default="assets/toy-shapes-sae", help="SAE folder (gets unet.<layer>/)")
    parser.add_argument("--expansion-factor", type=int, default=None, help="latents per input channel (default 4)")
    parser.add_argument("-k", "--k", type=int, default=None, help="active latents per token (default 8)")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training tokens (default 30)")
    parser.add_argument("--batch-size", type=int, default=None, help="tokens per step (default 1024)")
    parser.add_argument("--lr", type=float, default=None, help="default: sparsify's 2e-4 / sqrt(latents / 2^14)")
    parser.add_argument("--holdout", type=float, default=None, help="fraction of samples held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides choosing the model and the generations, e.g. model=toy-shapes "
        "stages.capture.prompt_dataset=toy-shapes num_inference_steps=25 stages.capture.num_images_per_prompt=4",
    )


def _given(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """Config fields for the options given on the command line (option dest -> config field)."""
    return {field: getattr(args, dest) for dest, field in names.items() if getattr(args, dest) is not None}


def run_train_toy(args: argparse.Namespace) -> dict[str, Any]:
    from ddr.toy.train import ToyTrainConfig, folder_size, train_toy

    config = ToyTrainConfig(
        progress=not args.no_progress,
        **_given(
            args,
            steps="steps",
            vae_steps="vae_steps",
            seed="seed",
            threads="threads",
            samples="n_samples",
            batch_size="batch_size",
            lr="lr",
        ),
    )
    result = train_toy(args.output, config)
    summary = result.summary()
    summary["size_bytes"] = folder_size(result.folder)
    print(json.dumps(summary, indent=1))
    return summary


def run_train_sae(args: argparse.Namespace) -> dict[str, Any]:
    from ddr.toy.train_sae import SaeTrainConfig, run_training

    config = SaeTrainConfig(
        progress=not args.no_progress,
        **_given(
            args,
            expansion_factor="expansion_factor",
            k="k",
            epochs="epochs",
            batch_size="batch_size",
            lr="lr",
            holdout="holdout",
            seed="seed",
            threads="threads",
        ),
    )
    report = run_training(args.output, args.overrides, config)
    held = report["heldout"] or report["train"]
    print(
        f"SAE {report['d_in']} -> {report['num_latents']} latents, k={report['k']}: held-out fraction of variance "
        f"explained {held['fve']:.4f}, dead latents {held['dead_fraction']:.4f} on {held['tokens']} held-out tokens "
        f"(train: {report['train']['fve']:.4f}, {report['train']['dead_fraction']:.4f}); saved to {report['folder']}"
    )
    return report


def main(argv: list[str]) -> int:
    """`python -m ddr.toy.cli train-toy ...` / `train-sae ...` (the same as `ddr train-toy` / `ddr train-sae`)."""
    parser = argparse.ArgumentParser(prog="ddr")
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_toy(commands.add_parser("train-toy", help="train the toy-shapes model on CPU"))
    add_train_sae(commands.add_parser("train-sae", help="train a TopK SAE on a layer's per-token activations"))
    args = parser.parse_args(argv)
    (run_train_toy if args.command == "train-toy" else run_train_sae)(args)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
