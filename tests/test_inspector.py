"""The inspector: Streamlit's AppTest drives the app over the demo representation; a real headless
Chromium (Debian's, through chromedriver) loads the served page (integration)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from ddr.inspector import APP
from ddr.inspector.data import KindView
from ddr.stages import representation
from tests.test_representation import HAND_CONCEPT, bare_experiment, demo_config, demo_root, hand_experiment

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TIMEOUT = 120


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_root(tmp_path_factory)


@pytest.fixture(scope="module")
def experiment(root: Path) -> Path:
    return demo_config(root).experiment_dir


def open_app(experiment_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("DDR_EXPERIMENT_DIR", str(experiment_dir))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def tab(at: AppTest, label: str) -> Any:
    return next(t for t in at.tabs if t.label == label)


def captions(block: Any) -> list[str]:
    return [c for image in block.get("image") for c in image.captions] + [c.value for c in block.get("caption")]


def test_app_switches_modes_steps_through_channels_and_timesteps_and_opens_every_tab(
    experiment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    view = KindView(experiment, "raw")
    picks = json.loads((experiment.parents[1] / "picks.json").read_text())
    at = open_app(experiment, monkeypatch)
    first = at.session_state["channel_raw"]
    assert first == next(c for c in view.order if view.rows[c]["n_dreams"]), "opens on a channel with dreams"
    assert at.header[0].value == f"Raw channel {first}"
    assert len(at.get("vega_lite_chart")) >= 2, "activity profile and max-activation charts"
    assert [t.label for t in at.tabs] == ["Deep dreams", "Dataset examples", "Priors", "Channel overview", "Concepts"]
    channel = view.channel(first)
    assert at.session_state["t"] == channel.peaks[0][0], "starts at the highest peak"

    dreams = tab(at, "Deep dreams")
    labels = {m.label for m in dreams.get("metric")}
    assert {"activation", "normalised activation", "selectivity", "failed at step"} <= labels
    assert dreams.get("image"), "the dream image"
    assert any(c.startswith("final, seed") for c in captions(dreams))
    assert any("MLflow run" in c for c in captions(dreams)) and dreams.get("code"), "local store: run id + command"
    examples = tab(at, "Dataset examples")
    prompts = set(view.prompts)
    example_captions = [c for image in examples.get("image") for c in image.captions]
    assert example_captions and all(c.startswith("#") and any(p in c for p in prompts) for c in example_captions)
    priors = tab(at, "Priors")
    assert [c for image in priors.get("image") for c in image.captions] == ["seed 1", "seed 2"]
    assert "image not found" not in " ".join(captions(at))

    # the slider over intermediate steps, another seed variant, another run
    step = at.select_slider(key=next(k for k in at.session_state if str(k).startswith("dream_step_")))
    step.set_value(0)
    run(at)
    assert any(c.startswith("step 0") for c in captions(tab(at, "Deep dreams")))
    seed = at.radio(key=next(k for k in at.session_state if str(k).startswith("dream_seed_")))
    seed.set_value(1)
    run(at)
    assert any("seed 2" in c for c in captions(tab(at, "Deep dreams")))
    at.selectbox(key=f"dream_run_{first}").set_value(1)
    run(at)
    assert at.selectbox(key=f"dream_run_{first}").value == 1

    # timesteps: slider, peak buttons, jump to a timestep with results
    at.slider(key="t").set_value(900)
    run(at)
    assert at.session_state["t"] == 900
    at.button(key="peak_0").click()
    run(at)
    assert at.session_state["t"] == channel.peaks[0][0]
    target = channel.result_timesteps()[-1]
    at.selectbox(key="jump_t").set_value(target)
    run(at)
    assert at.session_state["t"] == target and at.selectbox(key="jump_t").value is None
    shown = tab(at, "Dataset examples").markdown[0].value
    assert f"timestep {channel.timesteps[channel.calls_near(target)[0]]}" in shown

    # channels: next / previous / search / only active
    at.button(key="next").click()
    run(at)
    second = view.neighbour(first, 1)
    assert at.session_state["channel_raw"] == second and at.header[0].value == f"Raw channel {second}"
    at.button(key="prev").click()
    run(at)
    assert at.session_state["channel_raw"] == first
    inactive = next(c for c in view.order if not view.rows[c]["active"])
    at.text_input(key="search").input(str(inactive))
    run(at)
    assert at.header[0].value == f"Raw channel {inactive}"
    assert any("No priors for raw channel" in i.value for i in at.info)
    at.text_input(key="search").input("99999")
    run(at)
    assert "no raw channel 99999" in at.warning[0].value and at.session_state["channel_raw"] == inactive
    at.checkbox(key="only_active").check()
    run(at)
    assert at.session_state["channel_raw"] in view.active_channels

    # the overview: sort by a metric, open a channel from it
    overview = tab(at, "Channel overview")
    assert overview.get("dataframe")
    at.selectbox(key="overview_metric").set_value("dream_selectivity")
    run(at)
    best = view.overview("dream_selectivity")[0]["channel"]
    assert best in picks["raw"]
    at.selectbox(key="overview_open").set_value(best)
    run(at)
    assert at.session_state["channel_raw"] == best and at.header[0].value == f"Raw channel {best}"

    # SAE mode
    at.radio(key="kind").set_value("sae")
    run(at)
    assert at.header[0].value.startswith("SAE feature ")
    feature = at.session_state["channel_sae"]
    assert feature in picks["sae"]
    assert len(at.get("vega_lite_chart")) >= 2 and tab(at, "Priors").get("image")
    at.button(key="next").click()
    run(at)
    assert at.header[0].value == f"SAE feature {KindView(experiment, 'sae').neighbour(feature, 1)}"


def test_missing_sae_dreams_and_priors_show_empty_states(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = bare_experiment(root, "bare-inspector")
    representation.run_representation(config)
    at = open_app(config.experiment_dir, monkeypatch)
    assert at.header[0].value.startswith("Raw channel") and len(at.get("vega_lite_chart")) >= 2
    infos = [i.value for i in at.info]
    assert any(i.startswith("No deep dreams yet") for i in infos)
    assert any(i.startswith("No priors yet") for i in infos)
    assert tab(at, "Dataset examples").get("image"), "examples need only capture + analysis"
    at.radio(key="kind").set_value("sae")
    run(at)
    assert not at.header and any("no SAE configured" in i.value for i in at.info)

    empty = root / "experiments" / "never-represented"
    empty.mkdir(exist_ok=True)
    at = open_app(empty, monkeypatch)
    assert any("ddr run representation" in i.value for i in at.info)
    at.text_input(key="experiment_dir").input(str(root / "nowhere"))
    run(at)
    assert any("is not a folder" in i.value for i in at.info)


def test_a_copied_data_root_opens_and_shows_its_images(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "copied-root"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("assets"))
    original = root / "experiments" / "default"
    moved = original.with_name("default-moved-away")
    original.rename(moved)  # nothing may be read from the original while the copy is open
    try:
        at = open_app(demo_config(copy).experiment_dir, monkeypatch)
        for label in ("Deep dreams", "Dataset examples", "Priors"):
            assert tab(at, label).get("image"), label
        assert "image not found" not in " ".join(captions(at))
    finally:
        moved.rename(original)


def test_ddr_inspect_runs_streamlit_on_loopback_unless_told_otherwise(
    experiment: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import cli

    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, args: calls.append(list(args)))
    assert cli.main(["inspect", f"data_root={root}", "--port", "9123"]) == 0
    assert cli.main(["inspect", f"data_root={root}", "--host", "0.0.0.0"]) == 0
    first, second = calls
    assert first[first.index("--server.address") + 1] == "127.0.0.1"
    assert first[first.index("--server.port") + 1] == "9123" and "--server.headless" in first
    assert first[first.index("--experiment-dir") + 1] == str(experiment.resolve())
    assert first[first.index("run") + 1] == str(APP)
    assert second[second.index("--server.address") + 1] == "0.0.0.0"
    assert second[second.index("--server.port") + 1] == "8501"


# --- issue 9: heatmaps, attribution, accentuation, ablation, concepts (hand-written stores, no model) ----------


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = hand_experiment(tmp_path_factory.mktemp("hand-inspector"))
    representation.run_representation(config)
    return config.experiment_dir


def image_captions(block: Any) -> list[str]:
    return [c for image in block.get("image") for c in image.captions]


def test_heatmap_toggles_swap_examples_and_priors_for_their_overlays(
    hand: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_app(hand, monkeypatch)
    assert (at.session_state["channel_raw"], at.session_state["t"]) == (1, 500), "channel 1 at its peak"
    assert not any("where it fires" in c for c in image_captions(tab(at, "Dataset examples")))
    at.toggle(key="show_heatmaps").set_value(True)
    run(at)
    shown = image_captions(tab(at, "Dataset examples"))
    assert [c.split(" · ")[:3] for c in shown] == [
        ["where it fires", "map max 3", "#1"],
        ["where it fires", "map max 2", "#2"],
    ], "each ranked example shows its overlay, highest first"
    assert shown[0].endswith("sample 2: a red square")
    at.slider(key="t").set_value(900)
    run(at)
    assert any("No heatmap at timestep 900" in i.value and "t = [500]" in i.value for i in at.info)
    assert not any("where it fires" in c for c in image_captions(tab(at, "Dataset examples")))
    at.button(key="heatmap_t_0_0").click()
    run(at)
    assert at.session_state["t"] == 500, "jump to the peak the maps exist for"

    priors = tab(at, "Priors")
    assert not any("where it fires" in c for c in image_captions(priors))
    at.toggle(key="show_prior_heatmaps").set_value(True)
    run(at)
    assert [c for c in image_captions(tab(at, "Priors")) if "where it fires" in c] == [
        "seed 1 · ablated · where it fires at t = 500",
        "seed 2 · ablated · where it fires at t = 500",
    ]


def test_ablation_shows_baseline_beside_ablated_with_mode_window_and_effect(
    hand: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_app(hand, monkeypatch)
    priors = tab(at, "Priors")
    assert image_captions(priors) == ["seed 1 · baseline", "seed 1 · ablated", "seed 2 · baseline", "seed 2 · ablated"]
    assert [(m.label, m.value) for m in priors.get("metric")] == [("effect", "-0.5"), ("effect", "-0.25")]
    caption = " ".join(c.value for c in priors.get("caption"))
    assert "prompt 'a red circle'" in caption and "steering mode: ablate" in caption and "t = 800…200" in caption


def test_dreams_show_the_start_image_the_attribution_toggle_and_the_new_metrics(
    hand: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_app(hand, monkeypatch)
    dreams = tab(at, "Deep dreams")
    run_label = at.selectbox(key="dream_run_1")
    assert run_label.format_func(0) == (
        "accent — negative · accentuation from examples (distance ≤ 3) · phase-only · diversity w=0.5"
    )
    assert image_captions(dreams)[:2] == ["start: dataset sample 2: a red square", "final, seed 1, t = 500"]
    metrics = {m.label: m.value for m in dreams.get("metric")}
    assert metrics["seed distance"] == "1" and metrics["seed similarity (diversity)"] == "0.3"
    at.toggle(key="show_attribution").set_value(True)
    run(at)
    shown = image_captions(tab(at, "Deep dreams"))
    assert "attribution · final, seed 1, t = 500" in shown
    assert [c for c in shown if c.startswith("attribution · seed")] == [
        "attribution · seed 1 · norm. act. 1",
        "attribution · seed 2 · norm. act. 2",
    ]
    overview = tab(at, "Channel overview")
    assert overview.get("dataframe")[0].value["settings"][0].startswith("negative")
    at.selectbox(key="overview_metric").set_value("dream_diversity")
    run(at)
    assert at.selectbox(key="overview_metric").value == "dream_diversity"


def test_concepts_view_lists_the_ranking_and_opens_each_channel_at_its_best_timestep(
    hand: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = open_app(hand, monkeypatch)
    concepts = tab(at, "Concepts")
    labels = [b.label for b in concepts.get("button")]
    assert labels == [f"open {e['channel']} at t = {e['best_timestep']}" for e in HAND_CONCEPT]
    chart = concepts.get("vega_lite_chart")
    assert len(chart) == 1 and "concept score per timestep (top 3)" in chart[0].proto.spec
    at.checkbox(key="only_active").check()
    run(at)
    at.button(key="concept_open_1").click()  # channel 0: inactive, so "only active" is lifted
    run(at)
    assert (at.session_state["channel_raw"], at.session_state["t"]) == (0, 500)
    assert at.header[0].value == "Raw channel 0" and not at.session_state["only_active"]
    at.button(key="concept_open_0").click()
    run(at)
    assert (at.session_state["channel_raw"], at.session_state["t"]) == (2, 900)
    assert at.slider(key="t").value == 900


def test_new_views_without_their_stores_say_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = hand_experiment(tmp_path, new_results=False)
    representation.run_representation(config)
    at = open_app(config.experiment_dir, monkeypatch)
    at.toggle(key="show_heatmaps").set_value(True)
    run(at)
    infos = [i.value for i in at.info]
    assert any(i.startswith("No heatmaps yet: no heatmap store at heatmaps/raw.zarr") for i in infos)
    assert any(i.startswith("No concept search yet") for i in infos)
    assert tab(at, "Dataset examples").get("image"), "the plain examples still show"


# --- a real browser --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class WebDriver:
    """The few W3C WebDriver calls the test needs, spoken to Debian's chromedriver over HTTP."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = ""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=90) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as error:
            detail = json.loads(error.read() or b"{}").get("value", {})
            raise RuntimeError(f"webdriver {method} {path}: {detail.get('message', error)}") from None

    def start(self, chromium: str, profile: Path) -> None:
        args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            f"--user-data-dir={profile}",
        ]
        options = {"binary": chromium, "args": args}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def run(self, script: str, *args: Any) -> Any:
        return self.call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("GET", f"/session/{self.session}/screenshot")))


RENDERED = """
const charts = document.querySelectorAll(
    '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg');
const images = [...document.querySelectorAll('[data-testid="stMain"] img')].filter(
    i => i.complete && i.naturalWidth > 0);
const running = document.querySelectorAll('[data-testid="stStatusWidgetRunningIcon"]').length;
const header = document.querySelector('[data-testid="stMain"] h2');
return {charts: charts.length, images: images.length, running: running,
        text: document.body.innerText, header: header ? header.innerText : ''};
"""


SHOW_TAB = """
const tab = [...document.querySelectorAll('[role="tab"]')].find(b => b.innerText.includes(arguments[0]));
tab.click();
tab.scrollIntoView();
"""


@pytest.fixture
def inspector(root: Path) -> Iterator[tuple[str, Path]]:
    """`ddr inspect` on a free loopback port, in its own process group (stopped by that id afterwards)."""
    port = _free_port()
    log = ARTIFACTS / "inspector-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "inspect", f"data_root={root}", "--port", str(port)],
            cwd=Path(__file__).resolve().parents[1],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"},
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/_stcore/health", 90)
        yield f"http://127.0.0.1:{port}/", log
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.integration
def test_headless_chromium_shows_the_channel_charts_and_images(inspector: tuple[str, Path], tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("needs Debian's chromium and chromedriver: apt-get install -y chromium chromium-driver")
    url, log = inspector
    port = _free_port()
    driver_process = subprocess.Popen(
        [chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    driver = WebDriver(port)
    try:
        _wait_http(f"{driver.base}/status", 30)
        driver.start(chromium, tmp_path / "profile")
        driver.call("POST", f"/session/{driver.session}/url", {"url": url})
        state: dict[str, Any] = {}
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:
            state = driver.run(RENDERED)
            if state["charts"] >= 2 and state["images"] >= 2 and not state["running"]:
                break
            time.sleep(1)
        driver.screenshot(ARTIFACTS / "inspector.png")
        assert state.get("charts", 0) >= 2, f"no charts rendered: {state.get('text', '')[:500]} (log: {log})"
        assert state["images"] >= 2, "dream, example and prior images load in the page"
        assert "Raw channel" in state["header"]
        for label in ("Deep dreams", "Dataset examples", "Priors", "activity profile", "max activation"):
            assert label in state["text"], label
        assert "Traceback" not in state["text"] and "Error" not in state["header"]
        # the deep-dream panel, then the dataset-examples tab, each scrolled into view and kept as a screenshot
        driver.run(SHOW_TAB, "Deep dreams")
        time.sleep(1)
        driver.screenshot(ARTIFACTS / "inspector-dreams.png")
        driver.run(SHOW_TAB, "Dataset examples")
        time.sleep(2)
        driver.screenshot(ARTIFACTS / "inspector-examples.png")
        text = driver.run("return document.body.innerText")
        assert "activation" in text and "#1" in text, "ranked examples with captions"
    finally:
        if driver.session:
            driver.call("DELETE", f"/session/{driver.session}")
        os.killpg(driver_process.pid, signal.SIGTERM)
        driver_process.wait(timeout=20)
