"""Hooks: timestep tracking from the UNet call, capture of one CFG branch, exact steering, any layer type."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ddr.config import ExperimentConfig
from ddr.hooks import (
    CaptureHook,
    SteeringHook,
    TimestepTracker,
    UnknownLayerError,
    find_layer,
    hooked,
    layer_output_shape,
    split_branch,
)
from ddr.models.pipeline import load_pipeline, model_dir
from ddr.stages import capture


class Block(nn.Module):
    """Stands in for a UNet whose target layer returns a tuple, as diffusers' transformer blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.layer(sample),)


class TupleLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return (x, "extra")


def test_tracker_reads_the_timestep_of_each_call() -> None:
    model = Block()
    tracker = TimestepTracker()
    with hooked(model, "layer", tracker):
        for t in (981, 961, 961, 1):
            model(torch.zeros(1, 2, 2, 2), torch.tensor(t))
    assert tracker.timesteps == [981, 961, 961, 1]
    assert not model._forward_pre_hooks and not model.layer._forward_hooks, "hooks are removed afterwards"


def test_capture_keeps_the_requested_cfg_half() -> None:
    model = Block()
    tracker = TimestepTracker()
    uncond = torch.full((2, 3, 4, 4), -1.0)
    cond = torch.arange(2 * 3 * 16, dtype=torch.float32).reshape(2, 3, 4, 4)
    hooks = {b: CaptureHook(tracker, n_calls=2, cfg=True, branch=b) for b in ("conditional", "unconditional")}
    with hooked(model, "layer", tracker, *hooks.values()):
        model(torch.cat([uncond, cond]), torch.tensor(5))
        model(torch.cat([uncond, cond]) * 2, torch.tensor(3))
    raw, _ = hooks["conditional"].result()
    assert raw.shape == (2, 2, 3)
    torch.testing.assert_close(raw[:, 0], cond.mean(dim=(2, 3)))
    torch.testing.assert_close(raw[:, 1], 2 * cond.mean(dim=(2, 3)))
    raw_u, _ = hooks["unconditional"].result()
    assert torch.all(raw_u[:, 0] == -1)
    assert torch.equal(split_branch(cond, cfg=False, branch="unconditional"), cond)


def test_steering_adds_strength_times_direction_per_sample_and_call() -> None:
    model = Block()
    tracker = TimestepTracker()
    directions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    strengths = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    with hooked(model, "layer", tracker, SteeringHook(tracker, directions, strengths)):
        first = model(torch.zeros(4, 3, 2, 2), torch.tensor(9))[0]  # CFG-sized batch: both halves steered alike
        second = model(torch.zeros(4, 3, 2, 2), torch.tensor(8))[0]
    assert torch.equal(first[0, :, 0, 0], torch.tensor([2.0, 0, 0])) and torch.equal(first[2], first[0])
    assert torch.equal(first[1], torch.zeros(3, 2, 2))
    assert torch.equal(second[1, :, 1, 1], torch.tensor([0.0, 2.0, 2.0])) and torch.equal(
        second[0], torch.zeros(3, 2, 2)
    )


def test_steering_keeps_tuple_outputs() -> None:
    model = nn.Sequential()
    model.add_module("inner", TupleLayer())
    tracker = TimestepTracker()
    tracker.timesteps.append(1)
    hook = SteeringHook(tracker, torch.ones(1, 2), torch.ones(1, 1))
    out = hook(model.inner, (), (torch.zeros(1, 2, 1, 1), "extra"))
    assert out[1] == "extra" and torch.equal(out[0], torch.ones(1, 2, 1, 1))


def test_unknown_layer_lists_nearest_names() -> None:
    with pytest.raises(UnknownLayerError, match="nearest valid names: layer"):
        find_layer(Block(), "layr")


def test_conv_resnet_layers_capture_too(tiny: ExperimentConfig) -> None:
    config = tiny.model_copy(update={"target_layer_name": "up_blocks.1.resnets.0", "use_sae": False})
    pipe = load_pipeline(config)
    _, raw, _, seen = capture.capture_batch(pipe, ["a cat"], [0], config, n_calls=7)
    assert raw.shape == (1, 7, 64) and len(seen) == 7 and np.isfinite(raw).all()
    unet_config = json.loads((model_dir(config) / "unet" / "config.json").read_text())
    assert layer_output_shape(unet_config, "down_blocks.0.resnets.0", 16) == (32, 16, 16)
