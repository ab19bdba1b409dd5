"""What deep dream maximises: a channel's (or SAE feature's) activation at the target layer.

An `Objective` turns the target layer's output [B, C, H, W] into one activation per channel
[B, width]; the optimiser picks each sample's own channel from it (and uses the rest for
selectivity). Objectives:

- `channel_mean` (raw channels): the spatial mean of the channel, as the capture stage records.
- `sae_mean` (SAE features): the mean over tokens (spatial positions) of `sae.encode` codes,
  the post-activation (top-k) codes, as the capture stage records and the original maximised.
  A feature outside every token's top k has code 0 and gets no gradient at all: the
  optimisation cannot start.
- `sae_pre_activation_mean`: the mean over tokens of the linear pre-activation
  `(x' - b_dec) . enc_f + b_enc_f` (x' the token, standardised under `input_unit_norm`), before
  the ReLU and the top-k. Not `sae.pre_acts`, which includes the ReLU (sparsify's definition)
  and so has no gradient where the pre-activation is negative at every token.
- `sae_dot_cosine`: Olah's "dot x cosine^p" (Lucid's `direction_neuron_cossim`) with the
  feature's decoder direction d_f: per token `(u . d_f) * max(cos(u, d_f), 0.1)^p`, u the
  SAE's input (`x' - b_dec`, the space the decoder directions live in), mean over tokens. The
  cosine is floored at 0.1 as in Lucid: with `relu(cos)` a token pointing away from d_f would
  get no gradient; with the floor it is pulled towards d_f. p = 1 (`cosine_power`) by default
  (Lucid's); a larger p favours tokens that point along d_f over ones that are just large.

`LayerActivation` is the activation function the optimiser calls: the UNet at timestep t with
the empty-prompt embedding (guidance 1: the conditional branch only), stopped right after the
target layer by raising a private exception from a forward hook, so later blocks never run.
Its `read` also returns the layer output, from which `diversity` (Lucid's Gram-matrix
diversity) is computed in the same forward pass. The objective runs in fp32 outside autocast
(top-k selection must not see bf16 rounding).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddr.hooks import find_layer, output_tensor, sae_tokens

if TYPE_CHECKING:
    from ddr.models.sae import SparseAutoencoder

ActivationFn = Callable[[Tensor, Tensor], Tensor]
"""(latents [B, c, h, w], timesteps [B]) -> per-channel activations [B, width]."""

COSINE_FLOOR = 0.1
"""Lucid's floor of the cosine in dot x cosine^p: tokens pointing away still get a gradient."""
NORM_EPS = 1e-8


class Readout(NamedTuple):
    """One forward's per-channel activations [B, width] and the target layer's output [B, C, H, W] (None if unknown)."""

    activations: Tensor
    layer_output: Tensor | None


ReadoutFn = Callable[[Tensor, Tensor], Readout]


def as_readout(fn: ActivationFn) -> ReadoutFn:
    """`fn.read` where the activation function has one (`LayerActivation`), else its activations alone."""
    read = getattr(fn, "read", None)
    if read is not None:
        return read  # type: ignore[no-any-return]
    return lambda latents, timesteps: Readout(fn(latents, timesteps), None)


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
        return self.sae.encoder(self.sae.encoder_input(sae_tokens(output))).float().mean(1)


class SaeDotCosine(SaeFeatureMean):
    name = "sae_dot_cosine"

    def __init__(self, sae: SparseAutoencoder, power: float = 1.0) -> None:
        super().__init__(sae)
        self.power = power

    def __call__(self, output: Tensor) -> Tensor:
        u = self.sae.encoder_input(sae_tokens(output)).float()  # [B, T, D]
        directions = self.sae.W_dec.float()  # [F, D]
        dot = u @ directions.T  # [B, T, F]
        norms = u.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS) * directions.norm(dim=-1).clamp_min(NORM_EPS)
        cosine = (dot / norms).clamp_min(COSINE_FLOOR)
        return (dot * cosine**self.power).mean(1)


OBJECTIVES = {
    "channel_mean": ChannelMean,
    "sae_mean": SaeFeatureMean,
    "sae_pre_activation_mean": SaePreActivationMean,
    "sae_dot_cosine": SaeDotCosine,
}
DEFAULT_OBJECTIVE = {"raw": "channel_mean", "sae": "sae_mean"}


def make_objective(
    kind: str, sae: SparseAutoencoder | None = None, name: str | None = None, *, cosine_power: float = 1.0
) -> Objective:
    """The objective for raw channels or SAE features (`name` picks a non-default one)."""
    name = name or DEFAULT_OBJECTIVE[kind]
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(OBJECTIVES)}")
    if name == "channel_mean":
        return ChannelMean()
    if sae is None:
        raise ValueError(f"objective {name!r} needs an SAE")
    if name == "sae_dot_cosine":
        return SaeDotCosine(sae, cosine_power)
    return OBJECTIVES[name](sae)


# --- diversity ----------------------------------------------------------------------------------


def normalised_gram(output: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C*C]: each sample's Gram matrix F F^T (F = [C, H*W]), scaled to unit Frobenius norm."""
    flat = output.float().flatten(2)
    return F.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1, eps=1e-10)


def diversity(output: Tensor, groups: Tensor) -> Tensor:
    """Each sample's mean Gram cosine to the other samples of its group [B] (Lucid's diversity objective).

    `groups` [B]: samples with the same id are the results of one target. The mean over a group's
    samples is the group's mean pairwise cosine similarity (Lucid's value is n - 1 times that).
    NaN for a sample with no group mate; a sample whose Gram is not finite (a diverging forward)
    is left out of its mates' means, so a failure stays local.
    """
    grams = normalised_gram(output)
    valid = torch.isfinite(grams).all(1)
    grams = torch.where(valid[:, None], grams, torch.zeros_like(grams))
    groups = groups.to(grams.device)
    mates = (groups[:, None] == groups[None, :]) & valid[:, None] & valid[None, :]
    mates.fill_diagonal_(False)
    count = mates.sum(1)
    total = ((grams @ grams.T) * mates).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), math.nan)


# --- the forward --------------------------------------------------------------------------------


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

    def read(self, latents: Tensor, timesteps: Tensor) -> Readout:
        """The activations and the layer output of one forward stopped at the layer."""
        captured: list[Readout] = []
        device_type = latents.device.type
        owner = threading.get_ident()

        def stop(_module: nn.Module, _args: Any, output: Any) -> None:
            if threading.get_ident() != owner:  # another thread's forward through a shared model
                return
            layer_output = output_tensor(output)
            with torch.autocast(device_type, enabled=False):
                captured.append(Readout(self.objective(layer_output), layer_output))
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

    def __call__(self, latents: Tensor, timesteps: Tensor) -> Tensor:
        return self.read(latents, timesteps).activations


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    param = next(module.parameters(), None)
    return default if param is None else param.dtype
