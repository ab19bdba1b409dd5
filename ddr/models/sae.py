"""One sparse autoencoder (SAE) module for a Stable Diffusion UNet layer.

Two on-disk formats load into the same `SparseAutoencoder`, so downstream code never
cares where an SAE came from:

* sparsify / SAeUron: ``cfg.json`` + ``sae.safetensors`` holding ``encoder.weight``
  [F, D], ``encoder.bias`` [F], ``W_dec`` [F, D], ``b_dec`` [D]. Always TopK, always
  subtracts ``b_dec`` before encoding; SAeUron adds ``input_unit_norm`` and the
  training-only ``batch_topk`` / ``sample_topk`` flags.
* SAELens: ``cfg.json`` + ``sae_weights.safetensors`` holding ``W_enc`` [D, F] (the
  transpose of sparsify's), ``b_enc``, ``W_dec``, ``b_dec`` and, for JumpReLU,
  ``threshold``. Architectures ``standard`` (ReLU), ``topk`` and ``jumprelu``.

Either can sit in a parent folder with one subfolder per hookpoint (sparsify's
``load_many`` layout, e.g. ``unet.up_blocks.1.attentions.1/``). Only safetensors are
read, never pickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

Activation = Literal["topk", "relu", "jumprelu"]

CFG_FILE = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"

UNIT_NORM_EPS = 1e-5
"""SAeUron divides the centred token by ``std + 1e-5`` (and multiplies back by ``std``)."""

# sparsify / SAeUron cfg.json keys. Every key must be known: newer sparsify versions
# add flags that change the architecture, and guessing would give wrong features.
_SPARSIFY_USED_KEYS = {"d_in", "num_latents", "k", "activation", "input_unit_norm"}
# Training-only or provenance keys. batch_topk / sample_topk pick the top-k over a whole
# batch or image while training; at inference SAeUron's scripts switch both off and
# take the top-k per token, which is what this module always does.
_SPARSIFY_IGNORED_KEYS = {
    "expansion_factor",
    "normalize_decoder",
    "multi_topk",
    "batch_topk",
    "sample_topk",
    "lookup_max_order",
    "gram_table_hash",
}
# Architecture flags this module does not implement; accepted only when switched off.
_SPARSIFY_OFF_KEYS = {"skip_connection", "transcode", "embed_skip", "gram_lookup"}

_SAELENS_ARCHITECTURES: dict[str, Activation] = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
}


class UnitNormStats(NamedTuple):
    """Per-token mean and std (each [..., 1]) removed by ``input_unit_norm``."""

    mean: Tensor
    std: Tensor


class SparseAutoencoder(nn.Module):
    """A TopK, ReLU or JumpReLU sparse autoencoder over the last axis of its input.

    Parameters use sparsify's layout (``encoder`` is an ``nn.Linear(d_in, num_latents)``)
    so the state dict is sparsify's own and `save_sae` needs no renaming.

    Inputs are cast to the parameters' dtype before anything else, as sparsify and
    SAELens do; `pre_acts`, `encode` and `decode` return that dtype, and `forward`
    casts the reconstruction back to the input's dtype so it can replace a hooked
    activation in place.
    """

    threshold: nn.Parameter | None

    def __init__(
        self,
        d_in: int,
        num_latents: int,
        *,
        activation: Activation = "topk",
        k: int | None = None,
        input_unit_norm: bool = False,
        apply_b_dec_to_input: bool = True,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ("topk", "relu", "jumprelu"):
            raise ValueError(f"unknown activation {activation!r}")
        if activation == "topk" and (k is None or not 1 <= k <= num_latents):
            raise ValueError(f"topk needs 1 <= k <= num_latents={num_latents}, got {k}")
        if activation != "topk" and k is not None:
            raise ValueError(f"k is only meaningful for topk, not {activation!r}")
        self.d_in = d_in
        self.num_latents = num_latents
        self.k = k
        self.activation: Activation = activation
        self.input_unit_norm = input_unit_norm
        self.apply_b_dec_to_input = apply_b_dec_to_input

        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.encoder = nn.Linear(d_in, num_latents, **factory)
        self.W_dec = nn.Parameter(torch.empty(num_latents, d_in, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(num_latents, **factory))
        else:
            self.register_parameter("threshold", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def decoder_directions(self) -> Tensor:
        """W_dec [F, D]: row ``i`` is what one unit of feature ``i`` adds to the output.

        With ``input_unit_norm`` the rows live in the standardised space; in activation
        space a feature adds ``row * std`` of the token it is added to.
        """
        return self.W_dec

    def _standardise(self, x: Tensor) -> tuple[Tensor, UnitNormStats | None]:
        """SAeUron's ``input_unit_norm``: centre each token, divide by its (unbiased) std."""
        if not self.input_unit_norm:
            return x, None
        mean = x.mean(dim=-1, keepdim=True)
        centred = x - mean
        std = centred.std(dim=-1, keepdim=True)
        return centred / (std + UNIT_NORM_EPS), UnitNormStats(mean, std)

    def _encoder_input_and_stats(self, x: Tensor) -> tuple[Tensor, UnitNormStats | None]:
        sae_in, stats = self._standardise(x.to(self.dtype))
        if self.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        return sae_in, stats

    def encoder_input(self, x: Tensor) -> Tensor:
        """What the encoder multiplies [..., D]: the token standardised (``input_unit_norm``), minus
        ``b_dec`` if ``apply_b_dec_to_input``; the space the decoder directions live in."""
        return self._encoder_input_and_stats(x)[0]

    def _pre_acts_and_stats(self, x: Tensor) -> tuple[Tensor, UnitNormStats | None]:
        sae_in, stats = self._encoder_input_and_stats(x)
        return torch.relu(self.encoder(sae_in)), stats

    def pre_acts(self, x: Tensor) -> Tensor:
        """Dense ``ReLU(encoder(x' - b_dec))`` [..., F], before any sparsification.

        This is sparsify's ``EncoderOutput.pre_acts`` (and SAeUron's ``pre_acts``),
        ReLU included, for every activation: SAELens's ``hidden_pre`` is the same thing
        before the ReLU, and all three activations are exact functions of it. ``x'`` is
        the standardised token under ``input_unit_norm``; ``b_dec`` is subtracted only
        if ``apply_b_dec_to_input``.
        """
        return self._pre_acts_and_stats(x)[0]

    def _activate(self, pre: Tensor) -> Tensor:
        if self.activation == "topk":
            assert self.k is not None
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, indices, values)
        if self.activation == "jumprelu":
            assert self.threshold is not None
            return pre * (pre > self.threshold)
        return pre

    def encode_with_stats(self, x: Tensor) -> tuple[Tensor, UnitNormStats | None]:
        """Dense codes plus the stats `decode` needs to undo ``input_unit_norm``.

        The stats are returned rather than stored on the module so that encode/decode
        stay stateless (safe across hooks, threads and interleaved batches).
        """
        pre, stats = self._pre_acts_and_stats(x)
        return self._activate(pre), stats

    def encode(self, x: Tensor) -> Tensor:
        """Dense post-activation codes [..., F].

        TopK keeps the k largest of `pre_acts` per token (zeros elsewhere), which equals
        SAELens's top-k-then-ReLU. JumpReLU keeps a pre-activation above its threshold.
        Unlike SAeUron's own ``Sae.encode``, this standardises first when
        ``input_unit_norm`` is set, so the codes are the ones `forward` decodes.
        """
        return self.encode_with_stats(x)[0]

    def decode(self, codes: Tensor, stats: UnitNormStats | None = None) -> Tensor:
        """Dense codes [..., F] -> [..., D]; ``stats`` (from `encode_with_stats`) are
        required with ``input_unit_norm``, as only they map back to activation space."""
        out = codes.to(self.dtype) @ self.W_dec + self.b_dec
        if not self.input_unit_norm:
            return out
        if stats is None:
            raise ValueError("this SAE uses input_unit_norm: pass the stats from encode_with_stats()")
        return out * stats.std + stats.mean

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x``, in ``x``'s dtype."""
        codes, stats = self.encode_with_stats(x)
        return self.decode(codes, stats).to(x.dtype)


def random_topk_sae(d_in: int, num_latents: int, k: int, seed: int) -> SparseAutoencoder:
    """A seeded float32 TopK SAE for tests and demos that must not download anything.

    Decoder rows are unit norm and the encoder is tied to them (sparsify's init);
    small random biases make sure every code path sees a nonzero bias.
    """
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in, num_latents, activation="topk", k=k)
    directions = torch.randn(num_latents, d_in, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.encoder.weight.copy_(directions)
        sae.encoder.bias.copy_(0.1 * torch.randn(num_latents, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
    return sae


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> None:
    """Write ``folder/cfg.json`` + ``folder/sae.safetensors`` in sparsify's format.

    sparsify's ``SparseCoder.load_from_disk`` reads it back. Only TopK SAEs fit that
    format. An SAE that does not subtract ``b_dec`` before encoding is saved with the
    shift folded into the encoder bias (``b + W_enc @ b_dec``), which encodes exactly
    the same. ``input_unit_norm`` is written under SAeUron's key; `load_sae` honours
    it, sparsify ignores it.
    """
    if sae.activation != "topk":
        raise ValueError(f"the sparsify format only holds topk SAEs, not {sae.activation!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        bias = sae.encoder.bias
        if not sae.apply_b_dec_to_input:
            bias = bias + sae.encoder.weight @ sae.b_dec
        tensors = {
            "encoder.weight": sae.encoder.weight,
            "encoder.bias": bias,
            "W_dec": sae.W_dec,
            "b_dec": sae.b_dec,
        }
        save_file(
            {n: t.detach().contiguous() for n, t in tensors.items()},
            folder / SPARSIFY_WEIGHTS,
        )
    cfg = {
        "activation": "topk",
        "num_latents": sae.num_latents,
        "k": sae.k,
        "d_in": sae.d_in,
        "input_unit_norm": sae.input_unit_norm,
    }
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2))


def load_sae(
    path: str | Path,
    hookpoint: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> SparseAutoencoder:
    """Load a sparsify/SAeUron or SAELens SAE, picking the format from the weight file.

    ``path`` is an SAE folder (then ``hookpoint`` is not used) or a parent folder of
    per-hookpoint SAE folders, where ``hookpoint`` picks one with or without its
    ``unet.`` prefix (it may be omitted if there is only one). ``dtype=None`` keeps
    the stored dtype. The module is returned in eval mode.
    """
    folder = _resolve_folder(Path(path), hookpoint)
    cfg = json.loads((folder / CFG_FILE).read_text())
    if (folder / SPARSIFY_WEIGHTS).is_file():
        weights = folder / SPARSIFY_WEIGHTS
        spec = _sparsify_spec(cfg, folder)
        state = load_file(weights)
    elif (folder / SAELENS_WEIGHTS).is_file():
        weights = folder / SAELENS_WEIGHTS
        spec = _saelens_spec(cfg, folder)
        state = _saelens_to_sparsify_layout(load_file(weights))
    else:
        raise FileNotFoundError(
            f"{folder} has {CFG_FILE} but neither {SPARSIFY_WEIGHTS} (sparsify/SAeUron) nor {SAELENS_WEIGHTS} (SAELens)"
        )
    stored_dtype = state["W_dec"].dtype if "W_dec" in state else torch.float32
    sae = SparseAutoencoder(**spec, device=device, dtype=dtype or stored_dtype)
    expected = sae.state_dict()
    if set(state) != set(expected):
        raise ValueError(f"{weights}: expected tensors {sorted(expected)}, found {sorted(state)}")
    for name, param in expected.items():
        if state[name].shape != param.shape:
            raise ValueError(
                f"{weights}: {name} has shape {tuple(state[name].shape)}, expected {tuple(param.shape)} from {CFG_FILE}"
            )
    sae.load_state_dict(state)
    return sae.eval()


def _is_sae_folder(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file()


def _resolve_folder(path: Path, hookpoint: str | None) -> Path:
    """Map ``path`` (+ ``hookpoint``) to the folder holding one SAE."""
    if not path.is_dir():
        raise FileNotFoundError(f"SAE path {path} does not exist or is not a folder")
    if _is_sae_folder(path):
        return path
    available = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_sae_folder(p))
    if not available:
        raise FileNotFoundError(f"{path} holds neither {CFG_FILE} nor hookpoint subfolders with one")
    if hookpoint is None:
        if len(available) == 1:
            return path / available[0]
        raise ValueError(f"{path} holds several SAEs; pick a hookpoint from {available}")
    bare = hookpoint.removeprefix("unet.")
    for name in (hookpoint, bare, f"unet.{bare}"):
        if name in available:
            return path / name
    raise ValueError(f"no SAE for hookpoint {hookpoint!r} under {path}; available: {available}")


def _sparsify_spec(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Check a sparsify/SAeUron cfg; return `SparseAutoencoder` arguments."""
    known = _SPARSIFY_USED_KEYS | _SPARSIFY_IGNORED_KEYS | _SPARSIFY_OFF_KEYS
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(
            f"{folder / CFG_FILE}: unknown sparsify config keys {unknown}; they may "
            "change the architecture, so this SAE is not loaded"
        )
    switched_on = sorted(key for key in _SPARSIFY_OFF_KEYS if cfg.get(key))
    if switched_on:
        raise ValueError(
            f"{folder / CFG_FILE}: unsupported sparsify architecture ({switched_on} set); "
            "only plain TopK autoencoders are supported"
        )
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(
            f"{folder / CFG_FILE}: unsupported sparsify activation {activation!r}; only 'topk' is supported"
        )
    d_in = _required(cfg, "d_in", folder)
    # sparsify's defaults for keys an older cfg.json may lack.
    return {
        "d_in": d_in,
        "num_latents": cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32),
        "activation": "topk",
        "k": cfg.get("k", 32),
        "input_unit_norm": bool(cfg.get("input_unit_norm", False)),
        "apply_b_dec_to_input": True,
    }


def _saelens_spec(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Check a SAELens cfg (v6 keys, plus pre-6 defaults); return module arguments."""
    where = folder / CFG_FILE
    architecture = cfg.get("architecture", "standard")
    if architecture not in _SAELENS_ARCHITECTURES:
        raise ValueError(
            f"{where}: unsupported SAELens architecture {architecture!r}; supported: {sorted(_SAELENS_ARCHITECTURES)}"
        )
    activation = _SAELENS_ARCHITECTURES[architecture]
    legacy_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if architecture == "standard" and legacy_fn != "relu":
        raise ValueError(f"{where}: unsupported activation_fn {legacy_fn!r} for standard")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in ("none", "layer_norm"):
        raise ValueError(
            f"{where}: unsupported normalize_activations {normalize!r}; only 'none' and 'layer_norm' are supported"
        )
    if (cfg.get("reshape_activations") or "none") != "none":
        raise ValueError(f"{where}: reshape_activations is not supported")
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(f"{where}: finetuning_scaling_factor is not supported")
    k = None
    if activation == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if k is None:
            raise ValueError(f"{where}: topk SAE without 'k'")
    return {
        "d_in": _required(cfg, "d_in", folder),
        "num_latents": _required(cfg, "d_sae", folder),
        "activation": activation,
        "k": k,
        # SAELens's layer_norm is exactly SAeUron's input_unit_norm.
        "input_unit_norm": normalize == "layer_norm",
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
    }


def _saelens_to_sparsify_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename SAELens tensors to this module's names; W_enc [D, F] becomes [F, D]."""
    renames = {"W_enc": "encoder.weight", "b_enc": "encoder.bias"}
    out = {renames.get(name, name): t for name, t in state.items()}
    if "encoder.weight" in out:
        out["encoder.weight"] = out["encoder.weight"].T.contiguous()
    return out


def _required(cfg: dict[str, Any], key: str, folder: Path) -> Any:
    if key not in cfg:
        raise ValueError(f"{folder / CFG_FILE}: missing required key {key!r}")
    return cfg[key]
