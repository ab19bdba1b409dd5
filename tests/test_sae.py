"""SparseAutoencoder against the real sparsify package and hand-written references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig

from ddr.models.sae import (
    SparseAutoencoder,
    load_sae,
    random_topk_sae,
    save_sae,
)

D, F, K = 16, 64, 4
HOOK = "unet.up_blocks.1.attentions.1"
OTHER_HOOK = "unet.down_blocks.0.attentions.0"
ATOL = 1e-5


def _sparsify_coder(seed: int) -> SparseCoder:
    """A sparsify SAE with seeded, untied, nonzero-bias weights."""
    torch.manual_seed(seed)
    coder = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K))
    with torch.no_grad():
        coder.encoder.weight.normal_()
        coder.encoder.bias.normal_(std=0.5)
        coder.W_dec.normal_()
        coder.b_dec.normal_(std=0.5)
    return coder


def _dense(top_acts: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    return torch.zeros(top_acts.shape[0], F).scatter(-1, top_indices, top_acts)


def _inputs(seed: int, n: int = 12) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _assert_matches_sparsify(sae: SparseAutoencoder, coder: SparseCoder) -> None:
    x = _inputs(1)
    with torch.no_grad():
        top_acts, top_indices, pre_acts = coder.encode(x)
        dense = _dense(top_acts, top_indices)
        torch.testing.assert_close(sae.pre_acts(x), pre_acts, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae.encode(x), dense, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae.decode(dense), coder.decode(top_acts, top_indices), atol=ATOL, rtol=0)
        torch.testing.assert_close(sae(x), coder(x).sae_out, atol=ATOL, rtol=0)


def test_sparsify_parity(tmp_path: Path) -> None:
    coder = _sparsify_coder(0)
    coder.save_to_disk(tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    assert (sae.d_in, sae.num_latents, sae.k, sae.activation) == (D, F, K, "topk")
    assert sae.apply_b_dec_to_input and not sae.input_unit_norm
    _assert_matches_sparsify(sae, coder)
    torch.testing.assert_close(sae.decoder_directions, coder.W_dec)


def test_leading_dims_are_per_token(tmp_path: Path) -> None:
    coder = _sparsify_coder(0)
    coder.save_to_disk(tmp_path)
    sae = load_sae(tmp_path)
    x = _inputs(2, n=2 * 3 * 5)
    with torch.no_grad():
        flat = sae.encode(x)
        batched = sae.encode(x.reshape(2, 3, 5, D))
        assert batched.shape == (2, 3, 5, F)
        torch.testing.assert_close(batched.reshape(-1, F), flat)
        assert ((batched != 0).sum(-1) <= K).all()
        torch.testing.assert_close(sae(x.reshape(2, 15, D)).reshape(-1, D), sae(x))


@pytest.mark.parametrize("hookpoint", [HOOK, HOOK.removeprefix("unet.")])
def test_sparsify_hookpoint_parent_folder(tmp_path: Path, hookpoint: str) -> None:
    wanted, other = _sparsify_coder(0), _sparsify_coder(1)
    wanted.save_to_disk(tmp_path / HOOK)
    other.save_to_disk(tmp_path / OTHER_HOOK)
    sae = load_sae(tmp_path, hookpoint=hookpoint)
    _assert_matches_sparsify(sae, wanted)


def test_single_hookpoint_folder_needs_no_hookpoint(tmp_path: Path) -> None:
    coder = _sparsify_coder(3)
    coder.save_to_disk(tmp_path / HOOK)
    _assert_matches_sparsify(load_sae(tmp_path), coder)


def test_save_sae_loads_in_sparsify(tmp_path: Path) -> None:
    sae = random_topk_sae(D, F, K, seed=5)
    save_sae(sae, tmp_path / "out")
    coder = SparseCoder.load_from_disk(tmp_path / "out")
    assert (coder.d_in, coder.num_latents, coder.cfg.k) == (D, F, K)
    _assert_matches_sparsify(sae, coder)
    _assert_matches_sparsify(load_sae(tmp_path / "out"), coder)


def test_random_topk_sae_is_seeded_with_unit_decoder_rows() -> None:
    a, b, c = (random_topk_sae(D, F, K, seed=s) for s in (7, 7, 8))
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    assert not torch.allclose(a.W_dec, c.W_dec)
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(F))
    assert a.b_dec.abs().sum() > 0 and a.encoder.bias.abs().sum() > 0


# --- SAELens -------------------------------------------------------------------------


def _write_saelens(
    folder: Path, architecture: str, apply_b_dec: bool, seed: int = 0, **extra: object
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": torch.randn(D, F, generator=gen),
        "b_enc": torch.randn(F, generator=gen),
        "W_dec": torch.randn(F, D, generator=gen),
        "b_dec": torch.randn(D, generator=gen),
    }
    if architecture == "jumprelu":
        weights["threshold"] = torch.rand(F, generator=gen) * 2
    cfg = {
        "architecture": architecture,
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": HOOK, "sae_lens_version": "6.5.0"},
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, folder / "sae_weights.safetensors")
    return weights


def _saelens_reference(
    w: dict[str, torch.Tensor], x: torch.Tensor, architecture: str, apply_b_dec: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens's encode/decode written out: (feature_acts, reconstruction)."""
    sae_in = x - w["b_dec"] if apply_b_dec else x
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    if architecture == "standard":
        acts = torch.relu(hidden_pre)
    elif architecture == "topk":
        top = hidden_pre.topk(K, dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        acts = torch.relu(hidden_pre) * (hidden_pre > w["threshold"])
    return acts, acts @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_saelens_matches_reference(tmp_path: Path, architecture: str, apply_b_dec: bool) -> None:
    extra = {"k": K} if architecture == "topk" else {}
    w = _write_saelens(tmp_path, architecture, apply_b_dec, **extra)
    sae = load_sae(tmp_path)
    expected_activation = {"standard": "relu"}.get(architecture, architecture)
    assert sae.activation == expected_activation
    assert sae.apply_b_dec_to_input is apply_b_dec
    x = _inputs(3) * 3
    acts, recon = _saelens_reference(w, x, architecture, apply_b_dec)
    with torch.no_grad():
        hidden_pre = (x - w["b_dec"] if apply_b_dec else x) @ w["W_enc"] + w["b_enc"]
        torch.testing.assert_close(sae.pre_acts(x), torch.relu(hidden_pre))
        codes = sae.encode(x)
        torch.testing.assert_close(codes, acts)
        torch.testing.assert_close(sae.decode(codes), recon)
        torch.testing.assert_close(sae(x), recon)
    assert (acts != 0).any() and (acts == 0).any()


def test_saelens_topk_with_fewer_positive_than_k(tmp_path: Path) -> None:
    """Top-k of the raw pre-activations then ReLU (SAELens) == ReLU then top-k."""
    w = _write_saelens(tmp_path, "topk", True, k=K)
    w["b_enc"] -= 100.0
    w["b_enc"][:2] += 200.0  # only two latents can fire
    save_file(w, tmp_path / "sae_weights.safetensors")
    sae = load_sae(tmp_path)
    x = _inputs(4)
    acts, recon = _saelens_reference(w, x, "topk", True)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts)
        torch.testing.assert_close(sae(x), recon)
    assert ((acts != 0).sum(-1) == 2).all()


def test_saelens_legacy_topk_k_from_activation_fn_kwargs(tmp_path: Path) -> None:
    _write_saelens(tmp_path, "topk", True, activation_fn_kwargs={"k": 3})
    assert load_sae(tmp_path).k == 3


def test_save_sae_folds_b_dec_when_not_applied(tmp_path: Path) -> None:
    _write_saelens(tmp_path / "lens", "topk", False, k=K)
    original = load_sae(tmp_path / "lens")
    save_sae(original, tmp_path / "sparsify")
    reloaded = load_sae(tmp_path / "sparsify")
    coder = SparseCoder.load_from_disk(tmp_path / "sparsify")
    x = _inputs(6) * 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode(x), original.encode(x))
        torch.testing.assert_close(reloaded(x), original(x))
        torch.testing.assert_close(coder(x).sae_out, original(x))


# --- input_unit_norm -----------------------------------------------------------------


def _write_saeuron(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """SAeUron's on-disk format: sparsify tensors, its own cfg keys."""
    gen = torch.Generator().manual_seed(seed)
    weights = {
        "encoder.weight": torch.randn(F, D, generator=gen),
        "encoder.bias": torch.randn(F, generator=gen) * 0.1,
        "W_dec": torch.randn(F, D, generator=gen),
        "b_dec": torch.randn(D, generator=gen) * 0.1,
    }
    cfg = {
        "expansion_factor": F // D,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": K,
        "batch_topk": True,
        "sample_topk": False,
        "input_unit_norm": True,
        "multi_topk": False,
        "d_in": D,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, folder / "sae.safetensors")
    return weights


def _unit_norm_reference(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    std = (x - mean).std(-1, keepdim=True)
    standardised = (x - mean) / (std + 1e-5)
    pre = torch.relu((standardised - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(K, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return (codes @ w["W_dec"] + w["b_dec"]) * std + mean


def test_input_unit_norm_forward_matches_reference(tmp_path: Path) -> None:
    w = _write_saeuron(tmp_path)
    sae = load_sae(tmp_path)
    assert sae.input_unit_norm and sae.k == K and sae.num_latents == F
    x = _inputs(8) * 7 + 20  # far from unit scale, so skipping the norm would show
    expected = _unit_norm_reference(w, x)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), expected)
        torch.testing.assert_close(sae(x[:1]), expected[:1])  # one token alone
        codes, stats = sae.encode_with_stats(x)
        torch.testing.assert_close(codes, sae.encode(x))
        torch.testing.assert_close(sae.decode(codes, stats), expected)
        sae.input_unit_norm = False
        assert not torch.allclose(sae(x), expected, atol=1e-2)


def test_input_unit_norm_decode_needs_stats(tmp_path: Path) -> None:
    _write_saeuron(tmp_path)
    sae = load_sae(tmp_path)
    with pytest.raises(ValueError, match="encode_with_stats"):
        sae.decode(torch.zeros(1, F))


def test_saelens_layer_norm_is_input_unit_norm(tmp_path: Path) -> None:
    w = _write_saelens(tmp_path, "topk", True, k=K, normalize_activations="layer_norm")
    sae = load_sae(tmp_path)
    assert sae.input_unit_norm
    sparsify_layout = {
        "encoder.weight": w["W_enc"].T,
        "encoder.bias": w["b_enc"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }
    x = _inputs(9) * 5 - 3
    with torch.no_grad():
        torch.testing.assert_close(sae(x), _unit_norm_reference(sparsify_layout, x))


# --- dtype ----------------------------------------------------------------------------


def test_dtype_override_and_forward_returns_input_dtype(tmp_path: Path) -> None:
    save_sae(random_topk_sae(D, F, K, seed=1), tmp_path)
    sae = load_sae(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in sae.parameters())
    x = _inputs(10)
    with torch.no_grad():
        assert sae.encode(x).dtype == torch.bfloat16
        out = sae(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, load_sae(tmp_path)(x).detach(), atol=0.1, rtol=0.05)


# --- errors ---------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_sae(tmp_path / "nope")


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        load_sae(tmp_path)


def test_cfg_without_weights(tmp_path: Path) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": D, "k": K}))
    with pytest.raises(FileNotFoundError) as err:
        load_sae(tmp_path)
    assert "sae.safetensors" in str(err.value)
    assert "sae_weights.safetensors" in str(err.value)


def test_unknown_hookpoint_lists_available(tmp_path: Path) -> None:
    _sparsify_coder(0).save_to_disk(tmp_path / HOOK)
    _sparsify_coder(1).save_to_disk(tmp_path / OTHER_HOOK)
    with pytest.raises(ValueError) as err:
        load_sae(tmp_path, hookpoint="mid_block.attentions.0")
    assert HOOK in str(err.value) and OTHER_HOOK in str(err.value)
    with pytest.raises(ValueError, match="pick a hookpoint"):
        load_sae(tmp_path)


@pytest.mark.parametrize("architecture", ["gated", "matryoshka_batchtopk", "transcoder"])
def test_unknown_saelens_architecture(tmp_path: Path, architecture: str) -> None:
    _write_saelens(tmp_path, architecture, True)
    with pytest.raises(ValueError, match=architecture):
        load_sae(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation": "groupmax"}, "groupmax"),
        ({"transcode": True}, "transcode"),
        ({"skip_connection": True}, "skip_connection"),
        ({"brand_new_flag": True}, "brand_new_flag"),
    ],
)
def test_unknown_sparsify_architecture(tmp_path: Path, change: dict[str, object], message: str) -> None:
    _sparsify_coder(0).save_to_disk(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=message):
        load_sae(tmp_path)


def test_unexpected_and_misshapen_tensors(tmp_path: Path) -> None:
    w = _write_saeuron(tmp_path)
    save_file({**w, "W_skip": torch.zeros(D, D)}, tmp_path / "sae.safetensors")
    with pytest.raises(ValueError, match="W_skip"):
        load_sae(tmp_path)
    save_file({**w, "W_dec": torch.zeros(F + 1, D)}, tmp_path / "sae.safetensors")
    with pytest.raises(ValueError, match="W_dec"):
        load_sae(tmp_path)


def test_save_sae_rejects_non_topk(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="relu"):
        save_sae(SparseAutoencoder(D, F, activation="relu"), tmp_path)
    assert not (tmp_path / "cfg.json").exists()
