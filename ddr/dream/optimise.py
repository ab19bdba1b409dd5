"""The batched deep-dream loop: each sample maximises its own target with its own random draws.

Per step (the original's order, DESIGN.md and the research notes):

1. (the original's `zero_grad`: the gradient is computed afresh for the latent only);
2. `z = augment(latents)` (jitter, rotation, scale; the sample's own draws);
3. optionally `z = add_noise(z, noise, t)` (the scheduler's forward noising at the sample's t,
   noise drawn from the sample's generator: "see through schedule noise");
4. `loss_i = -activation_i(z) + sum_p weight_p * penalty_p(latents_i)`, penalties on the
   un-augmented latent; the batch loss is the sum over samples, so each sample's gradient is
   the one it would have alone;
5. backward; a sample whose loss or gradient is not finite is marked failed at this step, its
   gradient zeroed and its latent frozen at its last finite value; the others continue;
6. spectral preconditioning of the gradient (optional), then Gaussian smoothing with the
   scheduled sigma;
7. AdamW step (weight decay from the config; AdamW is elementwise, so per-sample exact).

Every per-sample operation (augmentation, noise, penalties, gradient transforms, AdamW) is
independent of the batch, so a batch of several targets equals the one-target-at-a-time loop
given the same seeds, up to float rounding of batched kernels.

After the last step the final latents are evaluated once more without augmentation (with the
noise of one more draw when see-through is on): `activation`, every channel's activation
(for selectivity) and the penalties come from that evaluation.

Selectivity: `a_target - mean_{c != target} a_c`, the target's activation minus the mean of
the layer's other channels' (features') activations, same objective, same forward pass; a
difference rather than a ratio because raw channel means can be zero or negative.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ddr.dream.objectives import ActivationFn, frozen
from ddr.dream.regularisers import Penalty, evaluate, penalties_from_config
from ddr.dream.transforms import Augmenter, GradientSmoother, SpectralPreconditioner, draw_noise, sample_generators

if TYPE_CHECKING:
    from ddr.config import DeepDreamConfig

NoiseFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(latents, noise, timesteps) -> noised latents, e.g. `scheduler.add_noise`."""


@dataclass(frozen=True)
class DreamSettings:
    """The optimiser's parameters (from `DeepDreamConfig` via `from_config`, or set directly in tests)."""

    num_steps: int = 100
    learning_rate: float = 0.05
    weight_decay: float = 0.0
    penalties: tuple[Penalty, ...] = ()
    spectral: bool = True
    smoothing_kernel_size: int = 9
    smoothing_sigma_start: float = 0.0
    smoothing_sigma_end: float = 0.0
    jitter_max: int = 0
    rotate_max: float = 0.0
    scale_max: float = 1.0
    see_through_noise: bool = False
    snapshot_every: int = 10
    loss_scale: float = 1.0  # static loss scaling (fp16 autocast); gradients are unscaled before use

    @classmethod
    def from_config(cls, settings: DeepDreamConfig, **overrides: object) -> DreamSettings:
        values: dict[str, object] = {
            "num_steps": settings.num_steps,
            "learning_rate": settings.learning_rate,
            "weight_decay": settings.weight_decay,
            "penalties": penalties_from_config(settings),
            "spectral": settings.use_gradient_spectral_filtering,
            "smoothing_kernel_size": settings.gradient_smoothing_kernel_size,
            "smoothing_sigma_start": settings.gradient_smoothing_sigma_start,
            "smoothing_sigma_end": settings.gradient_smoothing_sigma_end,
            "jitter_max": settings.jitter_max,
            "rotate_max": settings.rotate_max,
            "scale_max": settings.scale_max,
            "see_through_noise": settings.see_through_schedule_noise,
            "snapshot_every": settings.intermediate_opt_results_every_n_steps,
        }
        return cls(**{**values, **overrides})  # type: ignore[arg-type]

    @property
    def snapshot_steps(self) -> list[int]:
        """Steps at whose start the latent and activation are recorded: 0, every, 2 * every, ..."""
        return list(range(0, self.num_steps, self.snapshot_every))

    @property
    def augmenter(self) -> Augmenter:
        return Augmenter(self.jitter_max, self.rotate_max, self.scale_max)

    @property
    def smoother(self) -> GradientSmoother:
        return GradientSmoother(
            self.smoothing_kernel_size, self.smoothing_sigma_start, self.smoothing_sigma_end, self.num_steps
        )

    @property
    def penalty_names(self) -> list[str]:
        return [p.name for p in self.penalties]


@dataclass
class DreamResult:
    """Per-sample results of one batch, on the CPU (float32)."""

    latents: Tensor  # [B, c, h, w] final (a failed sample: its last finite latent)
    activation: Tensor  # [B] target activation of the final latent
    channel_activations: Tensor  # [B, width] every channel's activation of the final latent
    selectivity: Tensor  # [B]
    penalties: dict[str, Tensor]  # name -> [B], unweighted, of the final latent
    failed_step: Tensor  # [B] int64, -1 when the sample did not fail
    snapshot_steps: list[int]
    history_activation: Tensor  # [B, snapshots]: activation at the start of each snapshot step (NaN after failure)
    snapshots: Tensor  # [B, snapshots, c, h, w]: the latent at the start of each snapshot step
    step_activation: Tensor  # [steps, B]: activation at every step (NaN after failure)
    step_penalties: dict[str, Tensor] = field(default_factory=dict)  # name -> [steps, B]

    @property
    def failed(self) -> Tensor:
        return self.failed_step >= 0


def selectivity(channel_activations: Tensor, channels: Tensor) -> Tensor:
    """`a[target] - mean(a[other channels])` per sample; NaN with a single channel."""
    width = channel_activations.shape[1]
    target = channel_activations.gather(1, channels.view(-1, 1)).squeeze(1)
    if width < 2:
        return torch.full_like(target, math.nan)
    others = (channel_activations.sum(1) - target) / (width - 1)
    return target - others


def optimise(
    activation_fn: ActivationFn,
    init_latents: Tensor,
    channels: Sequence[int] | Tensor,
    timesteps: Sequence[int] | Tensor,
    seeds: Sequence[int],
    settings: DreamSettings,
    *,
    add_noise: NoiseFn | None = None,
) -> DreamResult:
    """Maximise `activation_fn(z, t)[i, channels[i]]` for every sample i, starting from `init_latents`.

    `init_latents` [B, c, h, w] (on the device the activation function runs on), `channels` [B]
    (indices into the activation function's width), `timesteps` [B], `seeds` [B]: sample i draws
    its augmentation and noise from `torch.Generator().manual_seed(seeds[i])`. `add_noise` is
    required when `settings.see_through_noise`.
    """
    if settings.see_through_noise and add_noise is None:
        raise ValueError("see_through_noise needs add_noise (e.g. scheduler.add_noise)")
    device = init_latents.device
    n = init_latents.shape[0]
    channels = torch.as_tensor(channels, dtype=torch.int64).to(device)
    timesteps = torch.as_tensor(timesteps, dtype=torch.int64).to(device)
    if not (len(channels) == len(timesteps) == len(seeds) == n):
        raise ValueError(f"{n} latents, {len(channels)} channels, {len(timesteps)} timesteps, {len(seeds)} seeds")
    generators = sample_generators(seeds)
    augmenter, smoother = settings.augmenter, settings.smoother
    precondition = SpectralPreconditioner()
    snapshot_at = {s: i for i, s in enumerate(settings.snapshot_steps)}

    latents = init_latents.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([latents], lr=settings.learning_rate, weight_decay=settings.weight_decay)
    failed_step = torch.full((n,), -1, dtype=torch.int64, device=device)
    step_activation = torch.full((settings.num_steps, n), math.nan, device=device)
    step_penalties = {name: torch.full_like(step_activation, math.nan) for name in settings.penalty_names}
    snapshots = torch.full((n, len(snapshot_at), *latents.shape[1:]), math.nan, device=device)
    history = torch.full((n, len(snapshot_at)), math.nan, device=device)
    mask_shape = (n, *([1] * (latents.ndim - 1)))

    def forward(z: Tensor) -> Tensor:
        if settings.see_through_noise:
            assert add_noise is not None
            noise = draw_noise(generators, z.shape[1:]).to(device, z.dtype)
            z = add_noise(z, noise, timesteps)
        return activation_fn(z, timesteps)

    modules = getattr(activation_fn, "modules", ())
    with frozen(*modules) if modules else contextlib.nullcontext():
        for step in range(settings.num_steps):
            alive_before = failed_step < 0
            if step in snapshot_at:
                snapshots[:, snapshot_at[step]] = latents.detach()
            z = augmenter(latents, generators)
            activations = forward(z).float()
            activation = activations.gather(1, channels.view(-1, 1)).squeeze(1)
            penalty_total, values = evaluate(settings.penalties, latents)
            loss = -activation + penalty_total
            # gradients for the latent only: no weight gradient is computed or accumulated
            (grad,) = torch.autograd.grad(loss.sum() * settings.loss_scale, latents)
            grad = grad / settings.loss_scale
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad).flatten(1).all(1)
            failed_step = torch.where(alive_before & ~finite, step, failed_step)
            alive = failed_step < 0
            grad = torch.where(alive.view(mask_shape), grad, torch.zeros_like(grad))
            if settings.spectral:
                grad = precondition(grad)
            latents.grad = smoother(grad, step)
            before = latents.detach().clone()
            optimizer.step()
            with torch.no_grad():
                latents.copy_(torch.where(alive.view(mask_shape), latents, before))
            record = torch.where(alive_before & finite, activation.detach(), math.nan)
            step_activation[step] = record
            for name, value in values.items():
                step_penalties[name][step] = torch.where(alive_before, value.detach(), math.nan)
            if step in snapshot_at:
                history[:, snapshot_at[step]] = record

        with torch.no_grad():
            final = forward(latents.detach()).float()
            _, final_penalties = evaluate(settings.penalties, latents.detach())
    final_activation = final.gather(1, channels.view(-1, 1)).squeeze(1)
    return DreamResult(
        latents=latents.detach().cpu(),
        activation=final_activation.cpu(),
        channel_activations=final.cpu(),
        selectivity=selectivity(final, channels).cpu(),
        penalties={k: v.cpu() for k, v in final_penalties.items()},
        failed_step=failed_step.cpu(),
        snapshot_steps=settings.snapshot_steps,
        history_activation=history.cpu(),
        snapshots=snapshots.cpu(),
        step_activation=step_activation.cpu(),
        step_penalties={k: v.cpu() for k, v in step_penalties.items()},
    )
