"""Provision: turn the configured model, SAE and prompt dataset into folders under `<data_root>/assets/`.

Every source ends in the same place (`assets/<models|saes|datasets>/<name>/`) with a
`.provisioned.json` marker written last, so later stages load every asset the same way and
an interrupted download is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from ddr.config import CONFIG_DIR, AssetSource, ConfigError, DatasetConfig, ExperimentConfig, load_group

log = logging.getLogger(__name__)
MARKER = ".provisioned.json"
REPO_ROOT = CONFIG_DIR.parent


class AssetMissingError(FileNotFoundError):
    """An asset is not provisioned and cannot be made here (e.g. a hub model while offline)."""


def asset_dir(config: ExperimentConfig, group: str, name: str) -> Path:
    return config.assets_dir / group / name


def is_provisioned(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def require(folder: Path, what: str) -> Path:
    """The folder of a provisioned asset, or an error that says how to provision it."""
    if not is_provisioned(folder):
        raise AssetMissingError(f"{what} is not provisioned at {folder}; run `ddr run provision` first")
    return folder


def _resolve_local(path: Path) -> Path:
    return path if path.is_absolute() else (REPO_ROOT / path)


def _generated(spec: AssetSource, dest: Path, config: ExperimentConfig) -> None:
    from ddr.models.generated import generate_model

    if spec.generator == "random-topk-sae":
        _generate_sae(spec, dest, config)
    else:
        generate_model(spec.generator or "", dest, spec.generator_args)


def _generate_sae(spec: AssetSource, dest: Path, config: ExperimentConfig) -> None:
    """A seeded random TopK SAE sized to the layer of a (provisioned) model, in the sparsify format."""
    from ddr.hooks import layer_output_shape
    from ddr.models.sae import random_topk_sae, save_sae

    args = dict(spec.generator_args)
    model_name = args.pop("model")
    layer = args.pop("layer")
    model_spec = load_group("model", model_name)
    from ddr.config import ModelConfig

    model_dir = provision_asset(ModelConfig.model_validate(model_spec), "models", config)
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    d_in = layer_output_shape(unet_config, layer, unet_config["sample_size"])[0]
    sae = random_topk_sae(
        d_in=d_in, num_latents=d_in * int(args["expansion_factor"]), k=int(args["k"]), seed=int(args["seed"])
    )
    save_sae(sae, dest / getattr(spec, "hookpoint", f"unet.{layer}"))


def _local(spec: AssetSource, dest: Path, _config: ExperimentConfig) -> None:
    source = _resolve_local(Path(spec.path or ""))
    if not source.exists():
        raise AssetMissingError(f"asset {spec.name!r}: local path {source} does not exist")
    if source.is_dir():
        shutil.copytree(source, dest, dirs_exist_ok=True)
    else:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / source.name)


def _final_dir(spec: AssetSource, dest: Path) -> Path:
    """The asset's folder once provisioned (`dest` is its `.<name>.partial` staging folder)."""
    return dest.parent / spec.name


def _hub_patterns(spec: AssetSource) -> list[str] | None:
    """allow_patterns as the hub sees them: relative to `subfolder` when one is set."""
    if not spec.subfolder:
        return spec.allow_patterns
    sub = spec.subfolder.strip("/")
    return [f"{sub}/{p.lstrip('/')}" for p in (spec.allow_patterns or ["*"])]


def _take_snapshot(root: Path, spec: AssetSource, dest: Path, *, move: bool) -> int:
    """Files of a snapshot folder that match the patterns, into dest (the subfolder's files at dest's top).

    A snapshot from the HF cache holds every file ever fetched for that commit, not only the
    allowed ones, so the patterns are applied here again. Returns the number of files taken.
    """
    from huggingface_hub.utils import filter_repo_objects

    files = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    ]
    patterns = _hub_patterns(spec)
    if patterns is not None:
        files = list(filter_repo_objects(files, allow_patterns=patterns))
    prefix = f"{spec.subfolder.strip('/')}/" if spec.subfolder else ""
    taken = 0
    for rel in files:
        if not rel.startswith(prefix):
            continue
        target = dest / rel[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            shutil.move(root / rel, target)
        else:
            shutil.copy2(root / rel, target)  # follows the cache's symlinks to its blobs
        taken += 1
    return taken


def _hub(spec: AssetSource, dest: Path, _config: ExperimentConfig) -> None:
    """`snapshot_download` of repo_id@revision (optionally one subfolder) into dest.

    Online, files download straight into the staging folder. When the hub cannot be reached
    (HF_HUB_OFFLINE=1, no network), a snapshot already in the HF cache (`hf download`) is used
    instead; if there is none, AssetMissingError says how to get it.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = f"{spec.repo_id}@{spec.revision or 'main'}"
    args: dict[str, Any] = {
        "repo_id": spec.repo_id or "",
        "revision": spec.revision,
        "repo_type": spec.repo_type,
        "allow_patterns": _hub_patterns(spec),
    }
    download = dest / ".hub-download"
    try:
        snapshot_download(**args, local_dir=download)
        taken = _take_snapshot(download, spec, dest, move=True)
    except LocalEntryNotFoundError as error:
        try:
            cached = Path(snapshot_download(**args, local_files_only=True))
        except LocalEntryNotFoundError:
            offline = bool(getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)())
            reason = "HF_HUB_OFFLINE is set" if offline else f"the hub could not be reached ({error})"
            raise AssetMissingError(
                f"asset {spec.name!r}: hub repo {repo} is not provisioned, not in the HF cache "
                f"({constants.HF_HUB_CACHE}), and {reason}. To fix: run `ddr run provision` on a "
                f"machine with network{' (unset HF_HUB_OFFLINE)' if offline else ''}, or fetch it "
                f"there with `hf download {spec.repo_id}` into an HF cache this machine reads "
                f"(HF_HUB_CACHE), or copy a provisioned {_final_dir(spec, dest)} here"
            ) from error
        log.info("asset %r: hub unreachable, using cached snapshot %s", spec.name, cached)
        taken = _take_snapshot(cached, spec, dest, move=False)
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise AssetMissingError(
            f"asset {spec.name!r}: hub repo {repo} ({spec.repo_type}) was not found: check "
            f"repo_id/revision; a private or gated repo needs `hf auth login` or HF_TOKEN ({error})"
        ) from error
    finally:
        shutil.rmtree(download, ignore_errors=True)
    if taken == 0:
        raise AssetMissingError(
            f"asset {spec.name!r}: no file of hub repo {repo} matches "
            f"subfolder={spec.subfolder!r} allow_patterns={spec.allow_patterns!r}"
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the asset folder (absolute path, `..`, link)."""


def _safe_zip_members(archive: zipfile.ZipFile, dest: Path) -> None:
    """Reject any zip member whose path escapes dest, instead of letting zipfile rewrite it."""
    root = dest.resolve()
    for member in archive.namelist():
        name = member.replace("\\", "/")
        parts = PurePosixPath(name).parts
        escapes = (
            name.startswith("/")
            or (len(name) > 1 and name[1] == ":")
            or ".." in parts
            or not (root / name).resolve().is_relative_to(root)
        )
        if escapes:
            raise UnsafeArchiveError(f"zip member {member!r} would be extracted outside {dest}; refusing the archive")


def _unpack_or_keep(file: Path, dest: Path) -> None:
    """Unpack a zip or tar archive into dest (its layout kept as is); move any other file into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as archive:
            _safe_zip_members(archive, dest)
            archive.extractall(dest)
        file.unlink()
    elif tarfile.is_tarfile(file):
        with tarfile.open(file) as archive:
            try:
                archive.extractall(dest, filter="data")
            except tarfile.FilterError as error:
                raise UnsafeArchiveError(f"tar member of {file.name} rejected: {error}") from error
        file.unlink()
    else:
        shutil.move(file, dest / file.name)


def _url(spec: AssetSource, dest: Path, _config: ExperimentConfig) -> None:
    """A plain URL download, checked against sha256 when given; archives are unpacked."""
    url = spec.url or ""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if name in ("", ".", ".."):
        name = "download"
    download = dest / ".url-download"
    download.mkdir(parents=True, exist_ok=True)
    file = download / name
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, file.open("wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except urllib.error.HTTPError as error:
        raise AssetMissingError(
            f"asset {spec.name!r}: download of {url} failed: HTTP {error.code} {error.reason}"
        ) from error
    except (OSError, ValueError) as error:
        raise AssetMissingError(f"asset {spec.name!r}: download of {url} failed: {error}") from error
    if spec.sha256:
        expected, actual = spec.sha256.strip().lower(), digest.hexdigest()
        if actual != expected:
            raise AssetMissingError(
                f"asset {spec.name!r}: checksum mismatch for {url}: expected sha256 {expected}, got {actual}"
            )
    _unpack_or_keep(file, dest)
    shutil.rmtree(download)


def _gdrive(spec: AssetSource, dest: Path, _config: ExperimentConfig) -> None:
    """A Google Drive file or folder with gdown, as the original provisions Style50 and UnlearnCanvas.

    A folder's contents land at dest's top (gdown puts them in `output` itself when it does
    not end in a separator); a file is unpacked if it is an archive, else kept by its name.
    gdown raises on failure (older versions returned None): both are errors.
    """
    import gdown

    # gdown 6 raises DownloadError (FileURLRetrievalError is one); gdown 5 has no DownloadError.
    gdown_errors = tuple(
        getattr(gdown.exceptions, name)
        for name in ("DownloadError", "FileURLRetrievalError", "FolderContentsMaximumLimitError")
        if hasattr(gdown.exceptions, name)
    )
    what = "folder" if spec.gdrive_folder else "file"
    download = dest / ".gdrive-download"
    try:
        if spec.gdrive_folder:
            result = gdown.download_folder(id=spec.gdrive_id, output=str(dest), quiet=True)
        else:
            download.mkdir(parents=True, exist_ok=True)
            result = gdown.download(id=spec.gdrive_id, output=f"{download}{os.sep}", quiet=True)
            if result:
                _unpack_or_keep(Path(result), dest)
    except (*gdown_errors, OSError) as error:
        raise AssetMissingError(
            f"asset {spec.name!r}: Google Drive {what} {spec.gdrive_id} could not be downloaded: {error}"
        ) from error
    finally:
        shutil.rmtree(download, ignore_errors=True)
    if not result:
        raise AssetMissingError(
            f"asset {spec.name!r}: Google Drive {what} {spec.gdrive_id} could not be downloaded "
            "(is it shared as 'Anyone with the link'? Drive also limits downloads per day)"
        )


SOURCES: dict[str, Callable[[AssetSource, Path, ExperimentConfig], None]] = {
    "generated": _generated,
    "local": _local,
    "hub": _hub,
    "url": _url,
    "gdrive": _gdrive,
}


def provision_asset(spec: AssetSource, group: str, config: ExperimentConfig) -> Path:
    """Make `assets/<group>/<name>/` from its source unless already provisioned; idempotent."""
    dest = asset_dir(config, group, spec.name)
    if is_provisioned(dest):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        SOURCES[spec.source](spec, staging, config)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / MARKER).write_text(json.dumps(spec.model_dump(mode="json"), indent=1))
    staging.rename(dest)
    log.info("provisioned %s %s -> %s", group, spec.name, dest)
    return dest


def dataset_spec(name_or_path: str) -> DatasetConfig:
    """A prompt dataset by name (configs/datasets/) or a prompt file path."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".txt", ".jsonl", ".json") or os.sep in name_or_path:
        if not candidate.is_file():
            raise ConfigError(f"stages.capture.prompt_dataset: prompt file {candidate} does not exist")
        return DatasetConfig(name=candidate.stem, source="local", path=candidate.resolve())
    return DatasetConfig.model_validate(load_group("dataset", name_or_path))


def provision(config: ExperimentConfig) -> dict[str, Path]:
    """Every asset this experiment needs: the model, the SAE (if used) and the capture prompts."""
    paths: dict[str, Path] = {"model": provision_asset(config.model, "models", config)}
    if config.model.base_model:
        from ddr.config import ModelConfig

        base = ModelConfig.model_validate(load_group("model", config.model.base_model))
        paths["base_model"] = provision_asset(base, "models", config)
    if config.use_sae and config.sae is not None:
        paths["sae"] = provision_asset(config.sae, "saes", config)
    dataset = config.stages.capture.prompt_dataset
    spec = dataset_spec(dataset)
    if spec.source != "local" or Path(dataset).suffix == "":
        paths["dataset"] = provision_asset(spec, "datasets", config)
    return paths


def describe(paths: dict[str, Path]) -> dict[str, Any]:
    return {key: str(value) for key, value in paths.items()}
