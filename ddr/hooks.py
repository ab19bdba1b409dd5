"""PyTorch hooks on the UNet: timestep tracking, activation capture and steering.

The UNet is never modified: a forward pre-hook on the UNet reads the timestep of each call,
and forward hooks on the target layer read (capture) or change (steer) its output. Hooks are
installed by context managers and always removed, so a pipeline can be reused unhooked.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ddr.models.sae import SparseAutoencoder

Branch = Literal["conditional", "unconditional"]


class UnknownLayerError(ValueError):
    """The configured layer is not a module of the UNet."""


def find_layer(unet: nn.Module, name: str) -> nn.Module:
    """The UNet submodule called `name`; an unknown name fails with the nearest valid names."""
    name = name.removeprefix("unet.")
    modules = dict(unet.named_modules())
    if name and name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"nearest valid names: {', '.join(close)}" if close else "see `unet.named_modules()`"
    raise UnknownLayerError(f"target_layer_name: {name!r} is not a layer of this UNet; {hint}")


def output_tensor(output: Any) -> Tensor:
    """The activation tensor of a module's output (a tensor, a tuple, or a diffusers output)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    if hasattr(output, "sample"):
        return output.sample
    raise TypeError(f"cannot read an activation from a layer output of type {type(output).__name__}")


def replace_output(output: Any, tensor: Tensor) -> Any:
    """`output` with its activation tensor replaced, in the same container type."""
    if isinstance(output, Tensor):
        return tensor
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    output.sample = tensor
    return output


def layer_output_shape(unet_config: dict[str, Any], name: str, latent_size: int) -> tuple[int, ...]:
    """The layer's output shape for one sample, by a forward pass on the meta device (no compute, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    layer = find_layer(unet, name)
    shapes: list[tuple[int, ...]] = []

    def record(_module: nn.Module, _args: Any, output: Any) -> None:
        shapes.append(tuple(output_tensor(output).shape[1:]))

    handle = layer.register_forward_hook(record)
    try:
        sample = torch.empty(1, unet.config.in_channels, latent_size, latent_size, device="meta")
        context = torch.empty(1, 77, unet.config.cross_attention_dim, device="meta")
        unet(sample, torch.tensor(1, device="meta"), encoder_hidden_states=context)
    finally:
        handle.remove()
    return shapes[0]


class TimestepTracker:
    """Counts UNet calls and remembers each call's timestep (read from the call, not the scheduler)."""

    def __init__(self) -> None:
        self.timesteps: list[int] = []

    @property
    def call(self) -> int:
        """Index of the UNet call in progress (valid inside layer hooks)."""
        return len(self.timesteps) - 1

    def reset(self) -> None:
        self.timesteps.clear()

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        value = timestep.flatten()[0] if isinstance(timestep, Tensor) else timestep
        self.timesteps.append(int(value))


def split_branch(activation: Tensor, cfg: bool, branch: Branch) -> Tensor:
    """The rows of one CFG branch: diffusers stacks [unconditional, conditional] when CFG is on."""
    if not cfg:
        return activation
    half = activation.shape[0] // 2
    return activation[half:] if branch == "conditional" else activation[:half]


def sae_tokens(activation: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C]: one token per spatial position, as SAeUron trains on."""
    b, c = activation.shape[:2]
    return activation.reshape(b, c, -1).transpose(1, 2)


class CaptureHook:
    """Spatial means of the layer output (and of the SAE codes) per sample and UNet call.

    Results accumulate in a device buffer [calls, samples, width] and leave the device once,
    when `result()` is called after the batch.
    """

    def __init__(
        self,
        tracker: TimestepTracker,
        n_calls: int,
        cfg: bool,
        branch: Branch = "conditional",
        sae: SparseAutoencoder | None = None,
    ) -> None:
        self.tracker, self.n_calls, self.cfg, self.branch, self.sae = tracker, n_calls, cfg, branch, sae
        self.raw: Tensor | None = None
        self.features: Tensor | None = None

    @torch.no_grad()
    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> None:
        call = self.tracker.call
        if call >= self.n_calls:
            raise RuntimeError(f"the UNet was called {call + 1} times; the plan expected {self.n_calls}")
        rows = split_branch(output_tensor(output), self.cfg, self.branch).float()
        means = rows.mean(dim=(2, 3))
        if self.raw is None:
            self.raw = means.new_full((self.n_calls, *means.shape), float("nan"))
        self.raw[call] = means
        if self.sae is not None:
            codes = self.sae.encode(sae_tokens(rows).to(self.sae.W_dec.dtype)).float().mean(dim=1)
            if self.features is None:
                self.features = codes.new_full((self.n_calls, *codes.shape), float("nan"))
            self.features[call] = codes

    def result(self) -> tuple[Tensor, Tensor | None]:
        """(raw [samples, calls, channels], sae [samples, calls, features] or None) on the CPU."""
        if self.raw is None:
            raise RuntimeError("the capture hook saw no UNet call")
        raw = self.raw.transpose(0, 1).cpu()
        features = self.features.transpose(0, 1).cpu() if self.features is not None else None
        return raw, features


class SpatialMapHook:
    """Spatial maps (not means) of the layer output at chosen UNet calls, per sample of one CFG branch.

    `maps` turns the branch's output [B, C, H, W] (fp32) into the maps to keep [B, n, H, W] (a few
    raw channels, or SAE codes per token), so only those stay on the device until `result()`.
    """

    def __init__(
        self,
        tracker: TimestepTracker,
        calls: list[int],
        cfg: bool,
        branch: Branch,
        maps: Callable[[Tensor], Tensor],
    ) -> None:
        self.tracker, self.calls, self.cfg, self.branch, self.maps = tracker, sorted(set(calls)), cfg, branch, maps
        self.recorded: dict[int, Tensor] = {}

    @torch.no_grad()
    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> None:
        call = self.tracker.call
        if call in self.calls:
            self.recorded[call] = self.maps(split_branch(output_tensor(output), self.cfg, self.branch).float())

    def result(self) -> Tensor:
        """[len(calls), B, n, H, W] on the CPU, in the order of `calls` (sorted), in one copy."""
        missing = [c for c in self.calls if c not in self.recorded]
        if missing:
            raise RuntimeError(f"the UNet made no calls {missing}; it made {len(self.tracker.timesteps)}")
        return torch.stack([self.recorded[c] for c in self.calls]).cpu()


SteerMode = Literal["add", "replace", "cfg_aware", "ablate"]


class ChannelCodes:
    """Raw channels: the code of sample i's channel at each position is that channel's value there.

    Returns (code, unit) [N, H, W]: `code * unit * direction` is what the channel contributes to the
    output (unit is 1 for a one-hot direction), so replace/ablate stay exact: `x - x_c * e_c` zeroes the
    channel and leaves every other channel bit-identical.
    """

    def __init__(self, channels: Tensor) -> None:
        self.channels = channels

    def __call__(self, activation: Tensor) -> tuple[Tensor, Tensor]:
        rows = activation.shape[0]
        channels = self.channels.to(activation.device).repeat(rows // len(self.channels))
        code = activation[torch.arange(rows, device=activation.device), channels]
        return code, torch.ones_like(code)


class SaeFeatureCodes:
    """SAE features: per token, the code a_f of sample i's feature (`sae.encode`, top-k applied).

    Returns (code, unit) [N, H, W]; unit is the token's std under `input_unit_norm` (1 otherwise), so
    `a_f * unit * W_dec[f]` is exactly the feature's term of `sae.decode(codes)` in activation space, and
    subtracting it leaves the rest of the reconstruction and the SAE error `x - decode(codes)` untouched.
    """

    def __init__(self, sae: SparseAutoencoder, features: Tensor) -> None:
        self.sae, self.features = sae, features

    def __call__(self, activation: Tensor) -> tuple[Tensor, Tensor]:
        rows, _, h, w = activation.shape
        codes, stats = self.sae.encode_with_stats(sae_tokens(activation).to(self.sae.dtype))  # [N, HW, F]
        features = self.features.to(codes.device).repeat(rows // len(self.features))
        code = codes.gather(-1, features[:, None, None].expand(-1, codes.shape[1], 1)).squeeze(-1)
        unit = stats.std.squeeze(-1) if stats is not None else torch.ones_like(code)
        return code.reshape(rows, h, w), unit.reshape(rows, h, w)


FeatureCodes = ChannelCodes | SaeFeatureCodes


class SteeringHook:
    """Steers each sample's own direction d (a one-hot channel or an SAE decoder row) at the layer output.

    Per sample i and UNet call, with s = `strengths[i, call]`, only at calls where `steered[i, call]`
    (default: every call), at every spatial position:

    - add: x + s d (both CFG halves alike);
    - cfg_aware: the conditional half x + s d, the unconditional half x - s d, so classifier-free
      guidance (uncond + g (cond - uncond)) amplifies the push; needs the [uncond, cond] CFG batch;
    - replace: x - a d + s d, where a d is the feature's part of x (`codes`): a raw channel's map
      becomes s everywhere, an SAE feature's code becomes s at every token (its term in activation
      space; the rest of x, SAE error included, is unchanged);
    - ablate: x - a d: a raw channel becomes 0, an SAE feature is removed with the SAE error preserved
      (= decode(codes with a_f = 0) + (x - decode(codes))). `strengths` do not apply.

    Each sample has its own direction, strengths and calls, so samples steering different channels
    share a batch; a batch of k x len(directions) rows (CFG) steers each block of rows alike.
    """

    def __init__(
        self,
        tracker: TimestepTracker,
        directions: Tensor,
        strengths: Tensor,
        steered: Tensor | None = None,
        mode: SteerMode = "add",
        codes: FeatureCodes | None = None,
    ) -> None:
        if directions.shape[0] != strengths.shape[0]:
            raise ValueError(f"{directions.shape[0]} directions but {strengths.shape[0]} strength rows")
        if steered is not None and steered.shape != strengths.shape:
            raise ValueError(f"steered has shape {tuple(steered.shape)}, strengths {tuple(strengths.shape)}")
        if mode not in ("add", "replace", "cfg_aware", "ablate"):
            raise ValueError(f"unknown steer mode {mode!r}; allowed: add, replace, cfg_aware, ablate")
        if mode in ("replace", "ablate") and codes is None:
            raise ValueError(f"steer mode {mode!r} needs the feature's codes (ChannelCodes or SaeFeatureCodes)")
        self.tracker, self.directions, self.strengths = tracker, directions, strengths
        self.mode, self.codes = mode, codes
        self.steered = torch.ones_like(strengths, dtype=torch.bool) if steered is None else steered.bool()

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        call = self.tracker.call
        if call >= self.strengths.shape[1]:
            return output
        activation = output_tensor(output)
        n = self.directions.shape[0]
        repeat = activation.shape[0] // n
        if self.mode == "cfg_aware" and activation.shape[0] != 2 * n:
            raise RuntimeError(
                f"cfg_aware steering needs the CFG batch [unconditional, conditional] of 2 x {n} rows; "
                f"the layer output has {activation.shape[0]} (is guidance_scale > 1?)"
            )
        if not bool(self.steered[:, call].any()):
            return output
        on = self.steered[:, call].repeat(repeat)
        strength = torch.where(on, self.strengths[:, call].repeat(repeat).float(), 0.0)
        if self.mode == "cfg_aware":
            strength = torch.cat([-strength[:n], strength[n:]])  # the unconditional half first
        direction = self.directions.repeat(repeat, 1).float()
        if self.mode in ("add", "cfg_aware"):
            return replace_output(output, activation + (strength[:, None] * direction).to(activation)[:, :, None, None])
        assert self.codes is not None
        code, unit = (t.float() for t in self.codes(activation))
        on = on[:, None, None]
        steered = activation.float() - torch.where(on, code * unit, 0.0)[:, None] * direction[:, :, None, None]
        if self.mode == "replace":
            target = torch.where(on, strength[:, None, None] * unit, 0.0)
            steered = steered + target[:, None] * direction[:, :, None, None]
        return replace_output(output, steered.to(activation.dtype))


@contextmanager
def hooked(
    unet: nn.Module, layer_name: str, tracker: TimestepTracker, *layer_hooks: Callable[..., Any]
) -> Iterator[nn.Module]:
    """Install `tracker` on the UNet and the forward hooks on the layer for a `with` block; yields the layer."""
    layer = find_layer(unet, layer_name)
    tracker.reset()
    handles = [unet.register_forward_pre_hook(tracker, with_kwargs=True)]
    try:
        handles.extend(layer.register_forward_hook(hook) for hook in layer_hooks)
        yield layer
    finally:
        for handle in handles:
            handle.remove()
