"""The batched deep-dream loop: each sample maximises its own target with its own random draws.

The optimiser changes parameters that a `Parameterisation` maps to latents (`PlainLatent`: the
latent itself; `PhaseOnlyFourier`: the phase of its spectrum, the magnitude fixed). Per step
(the original's order, DESIGN.md and the research notes):

1. `latents = to_latents(params)` (the gradient is computed afresh, for the latent only);
2. `z = augment(latents)` (jitter, rotation, scale; the sample's own draws);
3. optionally `z = add_noise(z, noise, t)` (the scheduler's forward noising at the sample's t,
   noise drawn from the sample's generator: "see through schedule noise");
4. `loss_i = -s * activation_i(z) + w_div * diversity_i + sum_p weight_p * penalty_p(latents_i)
   + w_seed * mean((latents_i - start_i)^2)`, s = 1 (maximise) or -1 (`negative`: minimise);
   penalties on the un-augmented latent; the batch loss is the sum over samples, so each
   sample's gradient is the one it would have alone, except through `diversity_i`, which
   couples the samples of one group (the results of one target; `ddr.dream.objectives.diversity`);
5. backward: the activation's gradient w.r.t. the latent is taken on its own (it is also the
   attribution, below), the penalties' separately (they do not pass through the UNet), and the
   diversity's with a second backward through the UNet (only when its weight is > 0). A sample
   whose loss or gradient is not finite is marked failed at this step, its gradient zeroed and
   its parameters frozen at their last finite value; the others continue;
6. when the parameterisation asks for it (`precondition`, the plain latent): spectral
   preconditioning of the gradient (optional), then Gaussian smoothing with the scheduled sigma.
   Both are spatial filters, so with the phase parameterisation (whose magnitude already sets
   the spectrum) neither is applied; the latent gradient is then mapped to the parameters;
7. AdamW step (weight decay from the config; AdamW is elementwise, so per-sample exact);
8. with `seed_distance_max`, each sample's latent is projected back into the L2 ball of that
   radius around its start latent (plain latent only: a phase has no such projection).

Everything but the diversity is independent of the batch, and the diversity only couples
samples of one group, so a batch of several targets equals the one-target-at-a-time loop given
the same seeds, up to float rounding of batched kernels.

After the last step the final latents are evaluated once more without augmentation (with the
noise of one more draw when see-through is on): `activation` (raw, also for a negative run),
every channel's activation (for selectivity), the penalties and `diversity` (always, whatever
its weight, so runs with and without compare) come from that evaluation. `seed_distance` is the
L2 norm of final latent - start latent, the start latent being `to_latents(init(init_latents))`
(for the phase parameterisation: the initial latent's phase with the fixed magnitude).
`attribution` is the sum over the steps of |d activation / d latent| (the target activation
alone, not the penalties; w.r.t. the latent under any parameterisation; steps a sample failed
at or after add nothing).

Selectivity: `a_target - mean_{c != target} a_c`, the target's activation minus the mean of
the layer's other channels' (features') activations, same objective, same forward pass; a
difference rather than a ratio because raw channel means can be zero or negative. A negative
run is selective when this is low (negative).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ddr.dream.objectives import ActivationFn, Readout, as_readout, diversity, frozen
from ddr.dream.parameterisations import Parameterisation, PlainLatent
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
    negative: bool = False
    diversity_weight: float = 0.0
    seed_distance_weight: float = 0.0
    seed_distance_max: float | None = None
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
            "negative": settings.negative,
            "diversity_weight": settings.diversity_penalty_weight,
            "seed_distance_weight": settings.seed_distance_penalty_weight,
            "seed_distance_max": settings.seed_distance_max,
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
    activation: Tensor  # [B] target activation of the final latent (raw: not negated for a negative run)
    channel_activations: Tensor  # [B, width] every channel's activation of the final latent
    selectivity: Tensor  # [B]
    penalties: dict[str, Tensor]  # name -> [B], unweighted, of the final latent
    failed_step: Tensor  # [B] int64, -1 when the sample did not fail
    snapshot_steps: list[int]
    history_activation: Tensor  # [B, snapshots]: activation at the start of each snapshot step (NaN after failure)
    snapshots: Tensor  # [B, snapshots, c, h, w]: the latent at the start of each snapshot step
    step_activation: Tensor  # [steps, B]: activation at every step (NaN after failure)
    start_latents: Tensor  # [B, c, h, w]: the latent the optimisation started from
    seed_distance: Tensor  # [B]: L2 norm of latents - start_latents
    diversity: Tensor  # [B]: mean Gram cosine of the final latent to its group's others (NaN: none)
    attribution: Tensor  # [B, c, h, w]: sum over the steps of |d activation / d latent|
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


def project_to_ball(latents: Tensor, centre: Tensor, radius: float) -> Tensor:
    """Each sample moved back into the L2 ball of `radius` around its `centre` (unchanged inside it)."""
    delta = latents - centre
    norm = delta.flatten(1).norm(dim=1).view(-1, *([1] * (latents.ndim - 1)))
    return centre + delta * (radius / norm.clamp_min(1e-12)).clamp(max=1.0)


def seed_distance_penalty(latents: Tensor, start: Tensor) -> Tensor:
    """Mean squared distance of each sample to its start latent [B] (per element, as the range penalty)."""
    return (latents - start).square().flatten(1).mean(1)


def optimise(
    activation_fn: ActivationFn,
    init_latents: Tensor,
    channels: Sequence[int] | Tensor,
    timesteps: Sequence[int] | Tensor,
    seeds: Sequence[int],
    settings: DreamSettings,
    *,
    add_noise: NoiseFn | None = None,
    groups: Sequence[int] | Tensor | None = None,
    parameterisation: Parameterisation | None = None,
) -> DreamResult:
    """Maximise (minimise when `negative`) `activation_fn(z, t)[i, channels[i]]` for every sample i.

    `init_latents` [B, c, h, w] (on the device the activation function runs on) start the
    optimisation through `parameterisation.init` (default: the plain latent), `channels` [B]
    (indices into the activation function's width), `timesteps` [B], `seeds` [B]: sample i draws
    its augmentation and noise from `torch.Generator().manual_seed(seeds[i])`. `groups` [B]:
    samples with the same id are the results of one target, coupled by the diversity penalty
    (default: every sample its own group). `add_noise` is required when
    `settings.see_through_noise`. The diversity penalty needs an activation function with a
    `read` method (`LayerActivation`), which gives the layer output.
    """
    if settings.see_through_noise and add_noise is None:
        raise ValueError("see_through_noise needs add_noise (e.g. scheduler.add_noise)")
    param = parameterisation or PlainLatent()
    if settings.seed_distance_max is not None and not isinstance(param, PlainLatent):
        raise ValueError(f"seed_distance_max projects latents; the {param.name!r} parameterisation has no projection")
    device = init_latents.device
    n = init_latents.shape[0]
    channels = torch.as_tensor(channels, dtype=torch.int64).to(device)
    timesteps = torch.as_tensor(timesteps, dtype=torch.int64).to(device)
    groups = torch.arange(n) if groups is None else torch.as_tensor(groups, dtype=torch.int64)
    groups = groups.to(device)
    if not (len(channels) == len(timesteps) == len(seeds) == len(groups) == n):
        raise ValueError(
            f"{n} latents, {len(channels)} channels, {len(timesteps)} timesteps, {len(seeds)} seeds, "
            f"{len(groups)} groups"
        )
    read = as_readout(activation_fn)
    generators = sample_generators(seeds)
    augmenter, smoother = settings.augmenter, settings.smoother
    precondition = SpectralPreconditioner()
    snapshot_at = {s: i for i, s in enumerate(settings.snapshot_steps)}
    sign = -1.0 if settings.negative else 1.0
    coupled = settings.diversity_weight > 0

    params = param.init(init_latents.detach()).requires_grad_(True)
    with torch.no_grad():
        start = param.to_latents(params).detach().float().clone()
    optimizer = torch.optim.AdamW([params], lr=settings.learning_rate, weight_decay=settings.weight_decay)
    failed_step = torch.full((n,), -1, dtype=torch.int64, device=device)
    step_activation = torch.full((settings.num_steps, n), math.nan, device=device)
    step_penalties = {name: torch.full_like(step_activation, math.nan) for name in settings.penalty_names}
    snapshots = torch.full((n, len(snapshot_at), *start.shape[1:]), math.nan, device=device)
    history = torch.full((n, len(snapshot_at)), math.nan, device=device)
    attribution = torch.zeros_like(start)
    mask_shape = (n, *([1] * (start.ndim - 1)))

    def forward(z: Tensor) -> Readout:
        if settings.see_through_noise:
            assert add_noise is not None
            noise = draw_noise(generators, z.shape[1:]).to(device, z.dtype)
            z = add_noise(z, noise, timesteps)
        return read(z, timesteps)

    def latent_grad(output: Tensor, latents: Tensor, retain: bool = False) -> Tensor:
        """d output.sum() / d latents, with the static loss scale applied and removed."""
        (grad,) = torch.autograd.grad(output.sum() * settings.loss_scale, latents, retain_graph=retain)
        return grad / settings.loss_scale

    modules = getattr(activation_fn, "modules", ())
    with frozen(*modules) if modules else contextlib.nullcontext():
        for step in range(settings.num_steps):
            alive_before = failed_step < 0
            mapped = param.to_latents(params)
            if step in snapshot_at:
                snapshots[:, snapshot_at[step]] = mapped.detach()
            latents = mapped.detach().float().requires_grad_(True)
            readout = forward(augmenter(latents, generators))
            activation = readout.activations.float().gather(1, channels.view(-1, 1)).squeeze(1)
            activation_grad = latent_grad(activation, latents, retain=coupled)
            loss = -sign * activation.detach()
            grad = -sign * activation_grad
            if coupled:
                if readout.layer_output is None:
                    raise ValueError("the diversity penalty needs the layer output: an activation function with read")
                spread = settings.diversity_weight * diversity(readout.layer_output, groups).nan_to_num(0.0)
                grad = grad + latent_grad(spread, latents)
                loss = loss + spread.detach()
            penalty_total, values = evaluate(settings.penalties, latents)
            if settings.seed_distance_weight:
                penalty_total = penalty_total + settings.seed_distance_weight * seed_distance_penalty(latents, start)
            if penalty_total.requires_grad:
                (penalty_grad,) = torch.autograd.grad(penalty_total.sum(), latents)
                grad = grad + penalty_grad
            loss = loss + penalty_total.detach()
            finite = torch.isfinite(loss) & torch.isfinite(grad).flatten(1).all(1)
            failed_step = torch.where(alive_before & ~finite, step, failed_step)
            alive = failed_step < 0
            grad = torch.where(alive.view(mask_shape), grad, torch.zeros_like(grad))
            attribution += torch.where(alive.view(mask_shape), activation_grad.abs(), torch.zeros_like(grad))
            if param.precondition:
                if settings.spectral:
                    grad = precondition(grad)
                grad = smoother(grad, step)
            if mapped is params:
                params.grad = grad
            else:
                (params.grad,) = torch.autograd.grad(mapped, params, grad)
            before = params.detach().clone()
            optimizer.step()
            with torch.no_grad():
                params.copy_(torch.where(alive.view(mask_shape), params, before))
                if settings.seed_distance_max is not None:
                    params.copy_(project_to_ball(params, start, settings.seed_distance_max))
            record = torch.where(alive_before & finite, activation.detach(), math.nan)
            step_activation[step] = record
            for name, value in values.items():
                step_penalties[name][step] = torch.where(alive_before, value.detach(), math.nan)
            if step in snapshot_at:
                history[:, snapshot_at[step]] = record

        with torch.no_grad():
            final_latents = param.to_latents(params).detach().float()
            readout = forward(final_latents)
            final = readout.activations.float()
            _, final_penalties = evaluate(settings.penalties, final_latents)
            spread = (
                diversity(readout.layer_output, groups)
                if readout.layer_output is not None
                else torch.full((n,), math.nan, device=device)
            )
    final_activation = final.gather(1, channels.view(-1, 1)).squeeze(1)
    return DreamResult(
        latents=final_latents.cpu(),
        activation=final_activation.cpu(),
        channel_activations=final.cpu(),
        selectivity=selectivity(final, channels).cpu(),
        penalties={k: v.cpu() for k, v in final_penalties.items()},
        failed_step=failed_step.cpu(),
        snapshot_steps=settings.snapshot_steps,
        history_activation=history.cpu(),
        snapshots=snapshots.cpu(),
        step_activation=step_activation.cpu(),
        start_latents=start.cpu(),
        seed_distance=(final_latents - start).flatten(1).norm(dim=1).cpu(),
        diversity=spread.cpu(),
        attribution=attribution.cpu(),
        step_penalties={k: v.cpu() for k, v in step_penalties.items()},
    )
