"""Provision: every source (url, hub, gdrive, local, generated) ends in `assets/<group>/<name>/`.

No test touches the network: URL downloads go to an HTTP server on 127.0.0.1 started here, the
hub runs with HF_HUB_OFFLINE and a hand-made HF cache (or a fake `snapshot_download`), and gdown
is replaced by fakes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ddr.config import (
    AssetSource,
    ConfigError,
    DatasetConfig,
    ExperimentConfig,
    ModelConfig,
    SaeConfig,
    load_config,
    load_group,
)
from ddr.provision import (
    MARKER,
    AssetMissingError,
    UnsafeArchiveError,
    asset_dir,
    dataset_spec,
    is_provisioned,
    provision_asset,
    sha256_of,
)

HOOK = "unet.up_blocks.1.attentions.1"


@pytest.fixture
def config(tmp_path: Path) -> ExperimentConfig:
    return load_config([f"data_root={tmp_path / 'data'}"])


def _leftovers(config: ExperimentConfig, group: str) -> list[str]:
    """Everything under assets/<group>/: after a failure there must be nothing (no staging, no temp)."""
    folder = config.assets_dir / group
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _assert_nothing_provisioned(config: ExperimentConfig, group: str, name: str) -> None:
    dest = asset_dir(config, group, name)
    assert not is_provisioned(dest)
    assert not dest.exists()
    assert _leftovers(config, group) == [], "a failed provision left files behind"


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------- url


@pytest.fixture
def http_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A real HTTP server on 127.0.0.1 serving tmp_path/www, counting GET requests."""
    root = tmp_path / "www"
    root.mkdir()
    hits: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            hits.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(root=root, hits=hits, url=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


PROMPTS = b"a cat in watercolor style\na dog in pencil style\n"


def _url_dataset(url: str, name: str = "prompts", sha256: str | None = None) -> DatasetConfig:
    return DatasetConfig(name=name, source="url", url=url, sha256=sha256, format="text")


def test_url_plain_file_lands_in_asset_folder(config: ExperimentConfig, http_server: SimpleNamespace) -> None:
    (http_server.root / "prompts.txt").write_bytes(PROMPTS)
    dest = provision_asset(_url_dataset(f"{http_server.url}/prompts.txt"), "datasets", config)
    assert dest == config.assets_dir / "datasets" / "prompts"
    assert (dest / "prompts.txt").read_bytes() == PROMPTS
    assert _files(dest) == {"prompts.txt", MARKER}
    assert json.loads((dest / MARKER).read_text())["url"] == f"{http_server.url}/prompts.txt"
    assert _leftovers(config, "datasets") == ["prompts"]


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SAE_MEMBERS = {f"{HOOK}/cfg.json": b'{"k": 8}', f"{HOOK}/sae.safetensors": b"weights"}


@pytest.mark.parametrize(("filename", "pack"), [("sae.zip", _zip_bytes), ("sae.tar.gz", _tar_gz_bytes)])
def test_url_archives_are_unpacked(
    config: ExperimentConfig, http_server: SimpleNamespace, filename: str, pack: Any
) -> None:
    (http_server.root / filename).write_bytes(pack(SAE_MEMBERS))
    spec = SaeConfig(name="packed", source="url", url=f"{http_server.url}/{filename}")
    dest = provision_asset(spec, "saes", config)
    assert _files(dest) == {*SAE_MEMBERS, MARKER}, "the archive is unpacked (and not kept), its layout intact"
    for name, data in SAE_MEMBERS.items():
        assert (dest / name).read_bytes() == data


def test_url_correct_sha256_passes(config: ExperimentConfig, http_server: SimpleNamespace) -> None:
    (http_server.root / "prompts.txt").write_bytes(PROMPTS)
    digest = hashlib.sha256(PROMPTS).hexdigest()
    dest = provision_asset(_url_dataset(f"{http_server.url}/prompts.txt", sha256=digest.upper()), "datasets", config)
    assert is_provisioned(dest)
    assert sha256_of(dest / "prompts.txt") == digest


def test_url_wrong_sha256_fails_and_leaves_nothing(config: ExperimentConfig, http_server: SimpleNamespace) -> None:
    (http_server.root / "prompts.txt").write_bytes(PROMPTS)
    wrong = "0" * 64
    with pytest.raises(AssetMissingError) as error:
        provision_asset(_url_dataset(f"{http_server.url}/prompts.txt", sha256=wrong), "datasets", config)
    message = str(error.value)
    assert wrong in message
    assert hashlib.sha256(PROMPTS).hexdigest() in message
    assert "prompts.txt" in message
    _assert_nothing_provisioned(config, "datasets", "prompts")


def test_url_404_fails_clearly(config: ExperimentConfig, http_server: SimpleNamespace) -> None:
    url = f"{http_server.url}/missing.txt"
    with pytest.raises(AssetMissingError, match="404") as error:
        provision_asset(_url_dataset(url), "datasets", config)
    assert url in str(error.value)
    assert "'prompts'" in str(error.value)
    _assert_nothing_provisioned(config, "datasets", "prompts")


def test_url_rerun_does_not_download_again(config: ExperimentConfig, http_server: SimpleNamespace) -> None:
    (http_server.root / "prompts.txt").write_bytes(PROMPTS)
    spec = _url_dataset(f"{http_server.url}/prompts.txt")
    first = provision_asset(spec, "datasets", config)
    assert http_server.hits == ["/prompts.txt"]
    second = provision_asset(spec, "datasets", config)
    assert second == first
    assert http_server.hits == ["/prompts.txt"], "a provisioned asset must not be downloaded again"


def test_url_after_failure_retries_cleanly(config: ExperimentConfig, http_server: SimpleNamespace) -> None:
    spec = _url_dataset(f"{http_server.url}/prompts.txt")
    with pytest.raises(AssetMissingError):
        provision_asset(spec, "datasets", config)
    (http_server.root / "prompts.txt").write_bytes(PROMPTS)
    dest = provision_asset(spec, "datasets", config)
    assert (dest / "prompts.txt").read_bytes() == PROMPTS
    assert len(http_server.hits) == 2


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/ddr-evil-absolute.txt", "ok/../../evil.txt"])
def test_zip_member_escaping_dest_is_rejected(
    config: ExperimentConfig, http_server: SimpleNamespace, tmp_path: Path, member: str
) -> None:
    (http_server.root / "bad.zip").write_bytes(_zip_bytes({"fine.txt": b"ok", member: b"pwned"}))
    spec = DatasetConfig(name="bad", source="url", url=f"{http_server.url}/bad.zip")
    with pytest.raises(UnsafeArchiveError, match="outside"):
        provision_asset(spec, "datasets", config)
    _assert_nothing_provisioned(config, "datasets", "bad")
    assert not list(tmp_path.rglob("evil.txt"))
    assert not Path("/tmp/ddr-evil-absolute.txt").exists()


def test_tar_member_escaping_dest_is_rejected(config: ExperimentConfig, http_server: SimpleNamespace) -> None:
    (http_server.root / "bad.tar.gz").write_bytes(_tar_gz_bytes({"fine.txt": b"ok", "../evil.txt": b"pwned"}))
    spec = DatasetConfig(name="bad", source="url", url=f"{http_server.url}/bad.tar.gz")
    with pytest.raises(UnsafeArchiveError):
        provision_asset(spec, "datasets", config)
    _assert_nothing_provisioned(config, "datasets", "bad")
    assert not (config.assets_dir / "evil.txt").exists()


# --------------------------------------------------------------------------------------- hub


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE in effect and an empty HF cache of our own.

    huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE into `constants` at import time, so
    setting the environment alone is not enough: patch the constants too. The endpoint points
    at a closed local port, so even a miss could never reach the real hub.
    """
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return cache


def test_hub_offline_without_cache_says_how_to_fix(tmp_path: Path, hf_offline: Path) -> None:
    config = load_config([f"data_root={tmp_path / 'data'}", "model=sd-v1-4"])
    with pytest.raises(AssetMissingError) as error:
        provision_asset(config.model, "models", config)
    message = str(error.value)
    assert "CompVis/stable-diffusion-v1-4" in message
    assert "HF_HUB_OFFLINE" in message
    assert "ddr run provision" in message
    assert "hf download CompVis/stable-diffusion-v1-4" in message
    _assert_nothing_provisioned(config, "models", "sd-v1-4")


COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAKE_REPO = "ddr-test/made-up-sae"
FAKE_FILES = {
    "README.md": b"# made up",
    f"{HOOK}/cfg.json": b'{"d_in": 64}',
    f"{HOOK}/sae.safetensors": b"up.1.1 weights",
    "unet.up_blocks.1.attentions.2/cfg.json": b'{"d_in": 64}',
    "unet.up_blocks.1.attentions.2/sae.safetensors": b"up.1.2 weights",
}


def _fake_hf_cache(cache: Path) -> None:
    """A snapshot as huggingface_hub lays it out: blobs by hash, snapshot files symlinked to them, refs/main."""
    storage = cache / f"models--{FAKE_REPO.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    (storage / "blobs").mkdir()
    for name, data in FAKE_FILES.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = storage / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.mark.parametrize("revision", [None, COMMIT])
def test_hub_offline_uses_cached_snapshot_with_allow_patterns(
    config: ExperimentConfig, hf_offline: Path, revision: str | None
) -> None:
    _fake_hf_cache(hf_offline)
    spec = SaeConfig(
        name="cached-sae", source="hub", repo_id=FAKE_REPO, revision=revision, allow_patterns=[f"{HOOK}/*"]
    )
    dest = provision_asset(spec, "saes", config)
    assert _files(dest) == {f"{HOOK}/cfg.json", f"{HOOK}/sae.safetensors", MARKER}
    assert (dest / HOOK / "sae.safetensors").read_bytes() == b"up.1.1 weights"
    assert not (dest / HOOK / "sae.safetensors").is_symlink(), "the asset must not point into the HF cache"


def test_hub_offline_subfolder_takes_only_its_files(config: ExperimentConfig, hf_offline: Path) -> None:
    _fake_hf_cache(hf_offline)
    spec = SaeConfig(
        name="sub",
        source="hub",
        repo_id=FAKE_REPO,
        subfolder="unet.up_blocks.1.attentions.2",
        allow_patterns=["*.json"],
    )
    dest = provision_asset(spec, "saes", config)
    assert _files(dest) == {"cfg.json", MARKER}


def test_hub_patterns_matching_nothing_fail(config: ExperimentConfig, hf_offline: Path) -> None:
    _fake_hf_cache(hf_offline)
    spec = SaeConfig(name="none", source="hub", repo_id=FAKE_REPO, allow_patterns=["unet.down_blocks.0/*"])
    with pytest.raises(AssetMissingError, match="no file"):
        provision_asset(spec, "saes", config)
    _assert_nothing_provisioned(config, "saes", "none")


def test_hub_online_passes_arguments_and_keeps_only_the_subfolder(
    config: ExperimentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        local = Path(kwargs["local_dir"])
        # what the real one leaves in local_dir: the allowed files plus its own metadata
        for name in ("diffusion/diffuser/style50/unet/config.json", "diffusion/diffuser/style50/model_index.json"):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_text("{}")
        (local / ".cache" / "huggingface").mkdir(parents=True)
        (local / ".cache" / "huggingface" / "x.metadata").write_text("meta")
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    spec = ModelConfig(
        name="mirror",
        source="hub",
        repo_id="NormalUhr/UnlearnCanvas-ckpts",
        revision="abc",
        subfolder="diffusion/diffuser/style50",
        allow_patterns=["model_index.json", "unet/*"],
    )
    dest = provision_asset(spec, "models", config)
    assert len(calls) == 1
    call = calls[0]
    assert call["repo_id"] == "NormalUhr/UnlearnCanvas-ckpts"
    assert call["revision"] == "abc"
    assert call["repo_type"] == "model"
    assert call["allow_patterns"] == [
        "diffusion/diffuser/style50/model_index.json",
        "diffusion/diffuser/style50/unet/*",
    ]
    assert _files(dest) == {"model_index.json", "unet/config.json", MARKER}
    assert _leftovers(config, "models") == ["mirror"]


def test_saeuron_config_fetches_only_its_hookpoint(config: ExperimentConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    seen: dict[str, Any] = {}

    def fake_snapshot_download(**kwargs: Any) -> str:
        seen.update(kwargs)
        for name in FAKE_FILES:  # a careless fake writes everything; provision still keeps only the allowed
            (Path(kwargs["local_dir"]) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(kwargs["local_dir"]) / name).write_bytes(FAKE_FILES[name])
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sae = load_config([f"data_root={config.data_root}", "sae=saeuron"]).sae
    assert sae is not None
    dest = provision_asset(sae, "saes", config)
    assert seen["repo_id"] == "bcywinski/SAeUron"
    assert seen["allow_patterns"] == [f"{HOOK}/*"]
    assert sae.hookpoint == HOOK
    assert _files(dest) == {f"{HOOK}/cfg.json", f"{HOOK}/sae.safetensors", MARKER}


# ------------------------------------------------------------------------------------ gdrive


def test_gdrive_file_is_downloaded_by_id(config: ExperimentConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import gdown

    calls: list[dict[str, Any]] = []

    def fake_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        output = kwargs["output"]
        assert output.endswith(os.sep), "a folder output: gdown names the file as Drive does"
        path = Path(output) / "UnlearnCanvasMetadata.jsonl"
        path.write_text('{"file_name": "a.jpg", "text": "A Cat image in Ukiyoe style"}\n')
        return str(path)

    def no_folder(**kwargs: Any) -> list[str]:
        raise AssertionError("a file must not be fetched as a folder")

    monkeypatch.setattr(gdown, "download", fake_download)
    monkeypatch.setattr(gdown, "download_folder", no_folder)
    spec = DatasetConfig.model_validate(load_group("dataset", "unlearn-canvas"))
    dest = provision_asset(spec, "datasets", config)
    assert [c["id"] for c in calls] == ["1KpwY0uZ2tmGR7UZQ1Y2h3LW3UgkaFJtC"]
    assert "url" not in calls[0] or calls[0]["url"] is None
    assert _files(dest) == {"UnlearnCanvasMetadata.jsonl", MARKER}
    assert _leftovers(config, "datasets") == ["unlearn-canvas"]


def test_gdrive_archive_file_is_unpacked(config: ExperimentConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import gdown

    def fake_download(**kwargs: Any) -> str:
        path = Path(kwargs["output"]) / "sae.zip"
        path.write_bytes(_zip_bytes(SAE_MEMBERS))
        return str(path)

    monkeypatch.setattr(gdown, "download", fake_download)
    spec = SaeConfig(name="drive-sae", source="gdrive", gdrive_id="FILEID")
    dest = provision_asset(spec, "saes", config)
    assert _files(dest) == {*SAE_MEMBERS, MARKER}


def test_gdrive_folder_contents_land_at_the_top(config: ExperimentConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import gdown

    calls: list[dict[str, Any]] = []

    def fake_download_folder(**kwargs: Any) -> list[str]:
        calls.append(kwargs)
        root = Path(kwargs["output"])  # no trailing separator: gdown writes the contents into output itself
        written = []
        for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("x")
            written.append(str(root / name))
        return written

    def no_file(**kwargs: Any) -> str:
        raise AssertionError("a folder must not be fetched as a file")

    monkeypatch.setattr(gdown, "download_folder", fake_download_folder)
    monkeypatch.setattr(gdown, "download", no_file)
    spec = ModelConfig.model_validate(load_group("model", "style50"))
    dest = provision_asset(spec, "models", config)
    assert [c["id"] for c in calls] == ["18x40pLBcfNFyxBWZBGncTjqJTs_75SLx"]
    assert not calls[0]["output"].endswith(os.sep)
    assert _files(dest) == {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        MARKER,
    }


@pytest.mark.parametrize("folder", [False, True])
@pytest.mark.parametrize("failure", ["none", "raise"])
def test_gdrive_failed_download_raises(
    config: ExperimentConfig, monkeypatch: pytest.MonkeyPatch, folder: bool, failure: str
) -> None:
    import gdown

    def fail(**kwargs: Any) -> None:
        if failure == "raise":
            raise gdown.exceptions.FileURLRetrievalError("Cannot retrieve the public link of the file.")
        return None

    monkeypatch.setattr(gdown, "download", fail)
    monkeypatch.setattr(gdown, "download_folder", fail)
    spec = DatasetConfig(name="drive", source="gdrive", gdrive_id="BROKENID", gdrive_folder=folder)
    with pytest.raises(AssetMissingError, match="BROKENID"):
        provision_asset(spec, "datasets", config)
    _assert_nothing_provisioned(config, "datasets", "drive")


# ------------------------------------------------------------------------------------- local


def test_local_folder_is_copied(config: ExperimentConfig, tmp_path: Path) -> None:
    source = tmp_path / "pipeline"
    (source / "unet").mkdir(parents=True)
    (source / "model_index.json").write_text("{}")
    (source / "unet" / "config.json").write_text('{"a": 1}')
    dest = provision_asset(ModelConfig(name="mine", source="local", path=source), "models", config)
    assert _files(dest) == {"model_index.json", "unet/config.json", MARKER}
    assert (dest / "unet" / "config.json").read_text() == '{"a": 1}'
    assert _files(source) == {"model_index.json", "unet/config.json"}, "the source is left untouched"


def test_local_file_is_copied(config: ExperimentConfig, tmp_path: Path) -> None:
    source = tmp_path / "prompts.txt"
    source.write_bytes(PROMPTS)
    dest = provision_asset(DatasetConfig(name="mine", source="local", path=source), "datasets", config)
    assert _files(dest) == {"prompts.txt", MARKER}
    assert (dest / "prompts.txt").read_bytes() == PROMPTS


def test_local_missing_path_raises(config: ExperimentConfig, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(AssetMissingError, match="nowhere"):
        provision_asset(AssetSource(name="gone", source="local", path=missing), "models", config)
    _assert_nothing_provisioned(config, "models", "gone")


# --------------------------------------------------------------------------------- generated


def test_tiny_model_is_generated_and_idempotent(config: ExperimentConfig) -> None:
    dest = provision_asset(config.model, "models", config)
    assert dest == config.assets_dir / "models" / "tiny"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (dest / part).is_dir(), part
    index = json.loads((dest / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    mtime = (dest / "model_index.json").stat().st_mtime_ns
    marker_mtime = (dest / MARKER).stat().st_mtime_ns
    assert provision_asset(config.model, "models", config) == dest
    assert (dest / "model_index.json").stat().st_mtime_ns == mtime, "a provisioned model must not be rewritten"
    assert (dest / MARKER).stat().st_mtime_ns == marker_mtime


def test_tiny_topk_sae_is_generated_for_the_tiny_layer(config: ExperimentConfig) -> None:
    sae_module = pytest.importorskip("ddr.models.sae")
    if not all(hasattr(sae_module, f) for f in ("random_topk_sae", "save_sae")):
        pytest.skip("ddr.models.sae has no random_topk_sae/save_sae yet")
    assert config.sae is not None and config.sae.name == "tiny-topk"
    dest = provision_asset(config.sae, "saes", config)
    folder = dest / HOOK
    assert (folder / "sae.safetensors").is_file()
    cfg = json.loads((folder / "cfg.json").read_text())
    d_in = 64  # the tiny UNet's up_blocks.1 width
    assert cfg["d_in"] == d_in
    assert cfg["num_latents"] == d_in * 4
    assert cfg["k"] == 8
    assert is_provisioned(config.assets_dir / "models" / "tiny"), "the SAE's model was provisioned on the way"


# ------------------------------------------------------------------------------ dataset_spec


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_dataset_spec_prompt_file_is_local(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"my_prompts{suffix}"
    path.write_text("a prompt\n" if suffix == ".txt" else '{"text": "a prompt"}\n')
    spec = dataset_spec(str(path))
    assert spec.source == "local"
    assert spec.path == path.resolve()
    assert spec.name == "my_prompts"


def test_dataset_spec_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(ConfigError, match=r"absent\.jsonl") as error:
        dataset_spec(str(missing))
    assert str(missing) in str(error.value)


def test_dataset_spec_unknown_name_lists_allowed() -> None:
    with pytest.raises(ConfigError, match="allowed") as error:
        dataset_spec("no-such-dataset")
    message = str(error.value)
    assert "no-such-dataset" in message
    assert "demo" in message
    assert "unlearn-canvas" in message


def test_dataset_spec_by_name_reads_the_config() -> None:
    spec = dataset_spec("unlearn-canvas")
    assert (spec.source, spec.gdrive_id, spec.format, spec.text_field) == (
        "gdrive",
        "1KpwY0uZ2tmGR7UZQ1Y2h3LW3UgkaFJtC",
        "jsonl",
        "text",
    )
