"""What deep dream maximises: a channel's (or SAE feature's) activation at the target layer.

An `Objective` turns the target layer's output [B, C, H, W] into one activation per channel
[B, width]; the optimiser picks each sample's own channel from it (and uses the rest for
selectivity). Objectives:

- `channel_mean` (raw channels): the spatial mean of the channel, as the capture stage records.
- `sae_mean` (SAE features): the mean over tokens (spatial positions) of `sae.encode` codes,
  the post-activation (top-k) codes, as the capture stage records and the original maximised.
- `sae_pre_activation_mean`: the mean over tokens of `sae.pre_acts` (dense, before top-k), for
  features whose codes are rarely selected.

`LayerActivation` is the activation function the optimiser calls: the UNet at timestep t with
the empty-prompt embedding (guidance 1: the conditional branch only), stopped right after the
target layer by raising a private exception from a forward hook, so later blocks never run.
The objective runs in fp32 outside autocast (top-k selection must not see bf16 rounding).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ddr.hooks import find_layer, output_tensor, sae_tokens

if TYPE_CHECKING:
    from ddr.models.sae import SparseAutoencoder

ActivationFn = Callable[[Tensor, Tensor], Tensor]
"""(latents [B, c, h, w], timesteps [B]) -> per-channel activations [B, width]."""


class Objective(Protocol):
    name: str

    def __call__(self, output: Tensor) -> Tensor:
        """The target layer's output [B, C, ...] -> activation of every channel [B, width] (float32)."""
        ...


class ChannelMean:
    name = "channel_mean"

    def __call__(self, output: Tensor) -> Tensor:
        return output.float().flatten(2).mean(2)


class SaeFeatureMean:
    name = "sae_mean"

    def __init__(self, sae: SparseAutoencoder) -> None:
        self.sae = sae

    def __call__(self, output: Tensor) -> Tensor:
        return self.sae.encode(sae_tokens(output).to(self.sae.dtype)).float().mean(1)


class SaePreActivationMean(SaeFeatureMean):
    name = "sae_pre_activation_mean"

    def __call__(self, output: Tensor) -> Tensor:
        return self.sae.pre_acts(sae_tokens(output).to(self.sae.dtype)).float().mean(1)


OBJECTIVES = {"channel_mean": ChannelMean, "sae_mean": SaeFeatureMean, "sae_pre_activation_mean": SaePreActivationMean}
DEFAULT_OBJECTIVE = {"raw": "channel_mean", "sae": "sae_mean"}


def make_objective(kind: str, sae: SparseAutoencoder | None = None, name: str | None = None) -> Objective:
    """The objective for raw channels or SAE features (`name` picks a non-default one)."""
    name = name or DEFAULT_OBJECTIVE[kind]
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(OBJECTIVES)}")
    if name == "channel_mean":
        return ChannelMean()
    if sae is None:
        raise ValueError(f"objective {name!r} needs an SAE")
    return OBJECTIVES[name](sae)


class _StopForward(Exception):
    """Raised by the layer hook once the activation is read; caught by `LayerActivation`."""


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of `modules` do not require grad inside the block (no weight gradients are built)."""
    params = [p for m in modules for p in m.parameters()]
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


def empty_prompt_embedding(pipe: Any) -> Tensor:
    """[1, tokens, dim]: the text encoder's embedding of the empty prompt (conditional branch only)."""
    with torch.no_grad():
        embedding, _ = pipe.encode_prompt("", pipe.device, 1, False)
    return embedding.detach()


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); None (fp32) on the CPU or with precision=fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class LayerActivation:
    """The UNet's per-channel activation at the target layer, as a differentiable function of the latent.

    Calls `unet(latents, timesteps, encoder_hidden_states=context)` and stops it right after
    `layer_name` runs. `context` [1, tokens, dim] is expanded to each batch size once. Works on
    any module called like a diffusers UNet (tests use a small stand-in).
    """

    def __init__(
        self,
        unet: nn.Module,
        layer_name: str,
        objective: Objective,
        context: Tensor,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.unet, self.layer_name, self.objective = unet, layer_name, objective
        self.layer = find_layer(unet, layer_name)
        self.context = context
        self.amp_dtype = amp_dtype
        self._contexts: dict[int, Tensor] = {}
        self.calls = 0

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """What must not get weight gradients while optimising (the UNet, and the SAE if any)."""
        sae = getattr(self.objective, "sae", None)
        return (self.unet,) if sae is None else (self.unet, sae)

    @property
    def device(self) -> torch.device:
        return self.context.device

    def _context(self, batch: int) -> Tensor:
        if batch not in self._contexts:
            self._contexts[batch] = self.context.expand(batch, *self.context.shape[1:])
        return self._contexts[batch]

    def __call__(self, latents: Tensor, timesteps: Tensor) -> Tensor:
        captured: list[Tensor] = []
        device_type = latents.device.type
        owner = threading.get_ident()

        def stop(_module: nn.Module, _args: Any, output: Any) -> None:
            if threading.get_ident() != owner:  # another thread's forward through a shared model
                return
            with torch.autocast(device_type, enabled=False):
                captured.append(self.objective(output_tensor(output)))
            raise _StopForward

        handle = self.layer.register_forward_hook(stop)
        sample = latents if self.amp_dtype is not None else latents.to(_param_dtype(self.unet, latents.dtype))
        amp = (
            torch.autocast(device_type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        try:
            with amp:
                self.unet(sample, timesteps, encoder_hidden_states=self._context(latents.shape[0]))
        except _StopForward:
            pass
        finally:
            handle.remove()
        self.calls += 1
        if not captured:
            raise RuntimeError(f"the UNet forward finished without running layer {self.layer_name!r}")
        return captured[0]


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    param = next(module.parameters(), None)
    return default if param is None else param.dtype
