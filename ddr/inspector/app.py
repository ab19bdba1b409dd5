"""The ddr inspector: browse an experiment's representation in the browser.

Run with `ddr inspect` (or `streamlit run ddr/inspector/app.py -- --experiment-dir DIR`; the
folder may also come from $DDR_EXPERIMENT_DIR or the sidebar). Shows, per raw channel or SAE
feature: the activity profile with its peaks and the selected timestep, the max activation over
timesteps, and tabs for deep dreams (run with its settings, timestep, seed, optimisation steps,
metrics with seed distance and diversity, the start image of an accentuation, an attribution
toggle, MLflow run), ranked dataset examples with prompts (a toggle shows where the channel fires
in them, at the peaks the heatmap stage mapped), priors (steering mode and window; an ablation's
baseline beside it with the effect; the same heatmap toggle), an overview of every channel sorted
by a metric, and concept-search rankings whose rows open a channel at its best timestep. A stage
that has not run shows what to run instead of failing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

try:
    import ddr  # noqa: F401
except ImportError:  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from ddr.inspector.data import KIND_LABELS, KINDS, METRICS, Channel, KindView, available_kinds

SINGULAR = {"raw": "Raw channel", "sae": "SAE feature"}
OVERVIEW_ROWS = 200
EXAMPLE_COLUMNS = 4
CONCEPT_ROWS = 20
CONCEPT_COLUMNS = [1, 2, 2, 2, 3]
CONCEPT_CHART_CHANNELS = 5


def _argument_dir() -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--experiment-dir", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args.experiment_dir or os.environ.get("DDR_EXPERIMENT_DIR", "")


@st.cache_resource(show_spinner=False, max_entries=8)
def _load(experiment_dir: str, kind: str, stamp: float) -> KindView:
    return KindView(experiment_dir, kind)


def load_view(experiment_dir: str, kind: str) -> KindView:
    index = Path(experiment_dir) / "representation" / kind / "index.json"
    return _load(experiment_dir, kind, index.stat().st_mtime)


# --- state -------------------------------------------------------------------------------------------


def _channel_key(kind: str) -> str:
    return f"channel_{kind}"


def _step_channel(view: KindView, step: int) -> None:
    key = _channel_key(view.kind)
    st.session_state[key] = view.neighbour(st.session_state[key], step, st.session_state.get("only_active", False))


def _search(view: KindView) -> None:
    text = str(st.session_state.get("search", "")).strip()
    st.session_state["search_error"] = None
    if not text:
        return
    try:
        channel = int(text)
    except ValueError:
        st.session_state["search_error"] = f"{text!r} is not a channel id"
        return
    if channel not in view.position:
        st.session_state["search_error"] = (
            f"no {view.kind} channel {channel} (ids {min(view.order)}..{max(view.order)})"
        )
        return
    if st.session_state.get("only_active") and channel not in view.active_channels:
        st.session_state["only_active"] = False
    st.session_state[_channel_key(view.kind)] = channel


def _set_t(t: int) -> None:
    st.session_state["t"] = int(t)


def _jump_t() -> None:
    value = st.session_state.get("jump_t")
    if value is not None:
        st.session_state["t"] = int(value)
    st.session_state["jump_t"] = None


def _open_channel(kind: str) -> None:
    value = st.session_state.get("overview_open")
    if value is not None:
        st.session_state["only_active"] = False
        st.session_state[_channel_key(kind)] = int(value)
    st.session_state["overview_open"] = None


def _open_at(view: KindView, channel: int, t: int) -> None:
    """Select a channel at a timestep (a concept ranking's row): the t set here is kept, not the channel's default."""
    if st.session_state.get("only_active") and channel not in view.active_channels:
        st.session_state["only_active"] = False
    st.session_state[_channel_key(view.kind)] = int(channel)
    st.session_state["t"] = int(t)
    st.session_state["t_for"] = (view.kind, int(channel))


def _first_channel(view: KindView, options: list[int]) -> int:
    """Open on the first channel with deep dreams, else with priors, else the first (active first)."""
    for field in ("n_dreams", "n_priors"):
        found = next((c for c in options if view.rows[c].get(field)), None)
        if found is not None:
            return found
    return options[0]


def _default_t(channel: Channel) -> int:
    if channel.peaks:
        return channel.peaks[0][0]
    if np.nanmax(channel.profile, initial=0) > 0:
        return int(np.nanargmax(channel.profile))
    return int(channel.timesteps[0]) if len(channel.timesteps) else 0


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


# --- charts ------------------------------------------------------------------------------------------


def _x(total: int) -> alt.X:
    return alt.X("t:Q", title="timestep t (denoising runs right to left →)", scale=alt.Scale(domain=[total, 0]))


def profile_chart(channel: Channel, total: int, t: int) -> alt.LayerChart:
    """The top-k frequency on t with the observed calls, the peaks and the selected timestep."""
    curve = pd.DataFrame({"t": np.arange(len(channel.profile)), "frequency": channel.profile})
    observed = pd.DataFrame(
        {"t": channel.timesteps, "frequency": channel.frequency, "call": range(len(channel.timesteps))}
    )
    peaks = pd.DataFrame({"t": [p for p, _ in channel.peaks], "frequency": [h for _, h in channel.peaks]})
    layers = [
        alt.Chart(curve)
        .mark_area(opacity=0.25, line=True)
        .encode(x=_x(total), y=alt.Y("frequency:Q", title="top-k frequency")),
        alt.Chart(observed)
        .mark_circle(size=30, color="black")
        .encode(x=_x(total), y="frequency:Q", tooltip=["call", "t", "frequency"]),
        alt.Chart(pd.DataFrame({"t": [t]})).mark_rule(color="orange", strokeWidth=2).encode(x=_x(total)),
    ]
    if len(peaks):
        layers.append(
            alt.Chart(peaks)
            .mark_point(shape="triangle-down", size=120, color="red", filled=True)
            .encode(x=_x(total), y="frequency:Q", tooltip=["t", "frequency"])
        )
    return alt.layer(*layers).properties(title="activity profile (peaks ▼, selected t in orange)", height=220)


def max_activation_chart(channel: Channel, total: int, t: int) -> alt.LayerChart:
    """Max (and mean) activation over samples per timestep; the line interpolates between captured calls."""
    curve = pd.DataFrame({"t": np.arange(len(channel.max_activation_profile)), "max": channel.max_activation_profile})
    curve = curve[np.isfinite(curve["max"])]
    calls = pd.DataFrame({"t": channel.timesteps, "max": channel.max_activation, "mean": channel.mean_activation})
    y = alt.Y("max:Q", title="activation")
    layers = [
        alt.Chart(curve).mark_line(color="seagreen").encode(x=_x(total), y=y),
        alt.Chart(calls).mark_circle(size=30, color="seagreen").encode(x=_x(total), y=y, tooltip=["t", "max", "mean"]),
        alt.Chart(calls).mark_line(strokeDash=[4, 3], color="gray").encode(x=_x(total), y=alt.Y("mean:Q")),
        alt.Chart(pd.DataFrame({"t": [t]})).mark_rule(color="orange", strokeWidth=2).encode(x=_x(total)),
    ]
    return alt.layer(*layers).properties(title="max activation (mean dashed)", height=220)


def history_chart(snapshots: list[dict[str, Any]], step: Any) -> alt.LayerChart | None:
    rows = [s for s in snapshots if s.get("activation") is not None]
    if not rows:
        return None
    data = pd.DataFrame({"step": [s["step"] for s in rows], "activation": [s["activation"] for s in rows]})
    layers = [
        alt.Chart(data)
        .mark_line(point=True)
        .encode(x=alt.X("step:Q", axis=alt.Axis(tickMinStep=1, format="d")), y=alt.Y("activation:Q"))
    ]
    if isinstance(step, int):
        layers.append(alt.Chart(pd.DataFrame({"step": [step]})).mark_rule(color="orange").encode(x=alt.X("step:Q")))
    return alt.layer(*layers).properties(title="target activation during optimisation", height=180)


# --- tabs --------------------------------------------------------------------------------------------


def _image(view: KindView, relative: str | None, caption: str) -> None:
    path = view.path(relative)
    if path is None:
        st.caption(f"(image not found: {relative or 'not saved'})  \n{caption}")
    else:
        st.image(str(path), caption=caption, width="stretch")


def _run_label(run: dict[str, Any]) -> str:
    label = run["run"] + (f" ({run['label']})" if run.get("label") else "")
    return label + (f" — {run['summary']}" if run.get("summary") else "")


def dreams_tab(view: KindView, channel: Channel, t: int) -> None:
    if not channel.dreams:
        if not view.dream_runs:
            st.info(
                f"No deep dreams yet: {view.absent.get('dreams', 'no deep-dream run found')}. Run `ddr run deep_dream`."
            )
        else:
            runs = ", ".join(r["run"] for r in view.dream_runs)
            st.info(f"No deep dreams for {SINGULAR[view.kind].lower()} {channel.channel} in the runs {runs}.")
        return
    runs = channel.dreams
    pick = st.columns([2, 1, 2])
    run_i = pick[0].selectbox(
        "Run", range(len(runs)), format_func=lambda i: _run_label(runs[i]), key=f"dream_run_{channel.channel}"
    )
    run = runs[run_i]
    targets = run["targets"]
    ts = [target["t"] for target in targets]
    nearest = int(np.argmin([abs(v - t) for v in ts]))
    target_i = pick[1].selectbox(
        "Target timestep",
        range(len(targets)),
        index=nearest,
        format_func=lambda i: f"t = {ts[i]}",
        key=f"dream_t_{channel.channel}_{run_i}_{t}",
        help="the dream's timestep nearest the selected t; pick another here",
    )
    target = targets[target_i]
    results = target["results"]
    result_i = pick[2].radio(
        "Seed variant",
        range(len(results)),
        format_func=lambda i: f"seed {results[i]['seed']}",
        horizontal=True,
        key=f"dream_seed_{channel.channel}_{run_i}_{target_i}",
    )
    result = results[result_i]
    attribution = st.toggle(
        "show attribution (|d activation / d latent| over the optimisation)",
        key="show_attribution",
        help="swaps the final images for their attribution overlays",
    )
    left, right = st.columns([3, 2])
    with left:
        steps = [s["step"] for s in result["snapshots"]]
        options = [*steps, "final"]
        step = (
            st.select_slider(
                "Optimisation step (intermediate snapshots)",
                options=options,
                value="final",
                key=f"dream_step_{channel.channel}_{run_i}_{target_i}_{result_i}",
            )
            if len(options) > 1
            else "final"
        )
        if step == "final":
            shown = st.columns(2) if result.get("start_image") else [st.container()]
            if result.get("start_image"):
                with shown[0]:
                    _image(view, result["start_image"], _start_caption(view, result))
            with shown[-1]:
                _dream_image(view, result, f"final, seed {result['seed']}, t = {ts[target_i]}", attribution)
        else:
            snapshot = next(s for s in result["snapshots"] if s["step"] == step)
            activation = _fmt(snapshot.get("activation"))
            _image(view, snapshot.get("image"), f"step {step}, activation {activation}")
    with right:
        a, b = st.columns(2)
        a.metric("activation", _fmt(result.get("activation")))
        b.metric("normalised activation", _fmt(result.get("normalized_activation")))
        a.metric("selectivity", _fmt(result.get("selectivity")))
        failed = result.get("failed_step", -1)
        b.metric("failed at step", "did not fail" if failed is None or failed < 0 else str(failed))
        if result.get("seed_distance") is not None:
            a.metric("seed distance", _fmt(result["seed_distance"]), help="distance of the result from its start")
        if target.get("diversity") is not None:
            b.metric(
                "seed similarity (diversity)",
                _fmt(target["diversity"]),
                help="mean pairwise similarity of this target's results: lower means more distinct facets",
            )
        chart = history_chart(result["snapshots"], step)
        if chart is not None:
            st.altair_chart(chart, width="stretch")
        _mlflow(view, run)
    st.caption("all seeds at this timestep")
    columns = st.columns(max(1, len(results)))
    for column, r in zip(columns, results, strict=False):
        with column:
            _dream_image(view, r, f"seed {r['seed']} · norm. act. {_fmt(r.get('normalized_activation'))}", attribution)
    settings = {**(run.get("settings") or {})}
    params = next((d.get("params") for d in view.dream_runs if d["run"] == run["run"]), None)
    if params or settings:
        with st.expander("run parameters"):
            st.json({**(params or {}), **settings})


def _start_caption(view: KindView, result: dict[str, Any]) -> str:
    sample = result.get("start_sample")
    if sample is None or not 0 <= sample < len(view.prompts):
        return "start (noised to t)"
    return f"start: dataset sample {sample}: {view.prompts[sample]}"


def _dream_image(view: KindView, result: dict[str, Any], caption: str, attribution: bool) -> None:
    """The final dream image, or its attribution overlay when asked (saying so when there is none)."""
    if not attribution:
        _image(view, result.get("image"), caption)
    elif result.get("attribution"):
        _image(view, result["attribution"], f"attribution · {caption}")
    else:
        st.caption(f"(no attribution saved for this result)  \n{caption}")
        _image(view, result.get("image"), caption)


def _mlflow(view: KindView, run: dict[str, Any]) -> None:
    link = view.mlflow_link(run.get("mlflow_run_id"), run.get("mlflow_experiment_id"))
    if link is None:
        st.caption("MLflow: no run id recorded in this dream store")
    elif link.url:
        st.link_button("Open the MLflow run", link.url)
        st.caption(f"MLflow run `{link.run_id}`")
    else:
        st.caption(f"MLflow run `{link.run_id}` — local store; start the UI with:")
        if link.command:
            st.code(link.command, language="bash", wrap_lines=True)
        if link.hint:
            st.caption(link.hint)


def _heatmaps_missing(view: KindView, channel: Channel, what: str) -> str:
    if "heatmaps" in view.absent:
        return f"No heatmaps yet: {view.absent['heatmaps']}. Run `ddr run heatmaps`."
    return f"No heatmaps of {what} for {SINGULAR[view.kind].lower()} {channel.channel}."


def examples_tab(view: KindView, channel: Channel, t: int) -> None:
    show_maps = st.toggle(
        "show where it fires",
        key="show_heatmaps",
        help="the activation's spatial map over each example (kept at the channel's peak timesteps)",
    )
    if show_maps and not channel.heatmaps["examples"]:
        st.info(_heatmaps_missing(view, channel, "its dataset examples"))
    calls = channel.calls_near(t)
    for call in calls:
        value = int(channel.timesteps[call])
        st.markdown(f"**UNet call {call}, timestep {value}** (captured nearest to t = {t})")
        examples = channel.examples(call)
        if not examples:
            st.info("No dataset examples recorded at this call.")
            continue
        maps = channel.example_heatmaps(call) if show_maps else {}
        if show_maps and channel.heatmaps["examples"] and not maps:
            elsewhere = [c for c in calls if channel.example_heatmaps(c)]
            if elsewhere:  # a timestep value the scheduler visits twice: the maps are kept at one of its calls
                st.caption(f"No heatmap at this call; this timestep's maps are at UNet call {elsewhere[0]}.")
            else:
                mapped = channel.heatmap_timesteps()
                st.info(f"No heatmap at timestep {value}: maps exist at the peak timesteps t = {mapped}.")
                jump = st.columns(max(6, len(mapped)))
                for i, peak in enumerate(mapped):
                    jump[i].button(f"t = {peak}", key=f"heatmap_t_{call}_{i}", on_click=_set_t, args=(peak,))
        columns = st.columns(EXAMPLE_COLUMNS)
        for i, example in enumerate(examples):
            with columns[i % EXAMPLE_COLUMNS]:
                caption = (
                    f"#{example.rank + 1} · activation {example.value:.3g} · sample {example.sample}: {example.prompt}"
                )
                entry = maps.get(example.sample)
                overlay = view.path(entry.get("overlay")) if entry else None
                if overlay is not None:
                    caption = f"where it fires · map max {entry['map_max']:.3g} · {caption}"
                    st.image(str(overlay), caption=caption, width="stretch")
                elif example.image is None:
                    st.caption(f"(image not saved) {caption}")
                else:
                    st.image(str(example.image), caption=caption, width="stretch")


def _prior_caption(prior: dict[str, Any]) -> str:
    prompt = prior.get("prompt")
    if prior.get("prompt_source") == "top_examples":
        parts = ["regenerated from the channel's top dataset examples (their prompts and seeds)"]
    else:
        parts = [f"generated from the prompt {prompt!r}" if prompt else "generated from the empty prompt"]
    if prior.get("guidance_scale") is not None:
        parts.append(f"guidance {prior['guidance_scale']}")
    parts.append(f"steering mode: {prior.get('mode') or 'add'}")
    window = prior.get("window")
    if window:
        start, end = window
        parts.append(f"window t = {'—' if start is None else start}…{'—' if end is None else end}")
    steered = prior.get("steered_timesteps") or []
    if steered:
        parts.append(f"steered at timesteps {steered}")
    return " · ".join(parts)


def priors_tab(view: KindView, channel: Channel) -> None:
    prior = channel.prior
    if prior is None:
        if "prior" in view.absent:
            st.info(f"No priors yet: {view.absent['prior']}. Run `ddr run prior`.")
        else:
            st.info(
                f"No priors for {SINGULAR[view.kind].lower()} {channel.channel} "
                "(inactive, or outside the prior stage's channel selection)."
            )
        return
    st.caption(_prior_caption(prior))
    show_maps = st.toggle("show where it fires", key="show_prior_heatmaps", help="the channel's map over each prior")
    maps = channel.prior_heatmaps() if show_maps else {}
    if show_maps and not maps:
        st.info(_heatmaps_missing(view, channel, "its priors"))
    if prior.get("mode") == "ablate":
        _ablation(view, prior, maps)
        return
    columns = st.columns(max(1, min(len(prior["results"]), 5)))
    for i, result in enumerate(prior["results"]):
        with columns[i % len(columns)]:
            _prior_image(view, result, maps, _prior_label(result))


def _prior_label(result: dict[str, Any]) -> str:
    """`seed S`, with the regenerated dataset example's prompt when the prior is one (prompt_source=top_examples)."""
    return f"seed {result['seed']}" + (f" · {result['prompt']}" if result.get("prompt") else "")


def _prior_image(view: KindView, result: dict[str, Any], maps: dict[int, dict[str, Any]], caption: str) -> None:
    """A prior, or its heatmap overlay when one is shown and exists."""
    entry = maps.get(result["result"])
    if entry and view.path(entry.get("overlay")) is not None:
        _image(view, entry["overlay"], f"{caption} · where it fires at t = {entry.get('t')}")
    else:
        _image(view, result.get("image"), caption)


def _ablation(view: KindView, prior: dict[str, Any], maps: dict[int, dict[str, Any]]) -> None:
    """Per seed: the prompted generation without intervention beside the one with the feature ablated."""
    for result in prior["results"]:
        baseline, ablated, effect = st.columns([2, 2, 1])
        with baseline:
            _image(view, result.get("baseline"), f"{_prior_label(result)} · baseline")
        with ablated:
            _prior_image(view, result, maps, f"{_prior_label(result)} · ablated")
        effect.metric("effect", _fmt(result.get("effect")), help=prior.get("effect_rule") or "ablated vs baseline")


def overview_tab(view: KindView) -> None:
    metrics = view.metrics_available()
    if not metrics:
        st.info("No metric to sort by.")
        return
    if view.dream_runs:
        st.caption("deep-dream runs")
        st.dataframe(pd.DataFrame(view.run_overview()), hide_index=True, width="stretch")
    metric = st.selectbox("Sort channels by", metrics, format_func=lambda m: METRICS[m], key="overview_metric")
    run = None
    if metric.startswith("dream_") and len(view.dream_runs) > 1:
        names = [None, *[r["run"] for r in view.dream_runs]]
        run = st.selectbox("Deep-dream run", names, format_func=lambda r: "best over all runs" if r is None else r)
    only_active = st.checkbox("active channels only", key="overview_active")
    rows = view.overview(metric, run=run, only_active=only_active)[:OVERVIEW_ROWS]
    frame = pd.DataFrame(rows).rename(columns={"value": METRICS[metric]})
    st.dataframe(frame, hide_index=True, width="stretch", height=320)
    st.selectbox(
        "Open a channel",
        [r["channel"] for r in rows],
        index=None,
        placeholder="pick a channel from the list",
        key="overview_open",
        on_change=_open_channel,
        args=(view.kind,),
    )


def concepts_tab(view: KindView) -> None:
    concepts = view.concepts
    if not concepts:
        reason = view.absent.get("concepts", "no concept rankings")
        st.info(f"No concept search yet: {reason}. Run `ddr run concept_search`.")
        return
    i = st.selectbox(
        "Concept",
        range(len(concepts)),
        format_func=lambda j: f"{concepts[j]['name']} ({concepts[j]['n_concept']} vs {concepts[j]['n_rest']} samples)",
        key="concept",
    )
    concept = concepts[i]
    if concept.get("score_rule"):
        st.caption(f"score: {concept['score_rule']}")
    top = concept["top"][:CONCEPT_ROWS]
    header = st.columns(CONCEPT_COLUMNS)
    titles = ("rank", SINGULAR[view.kind].lower(), "mean score", "best timestep (score)", "")
    for column, title in zip(header, titles, strict=True):
        column.markdown(f"**{title}**")
    for rank, entry in enumerate(top):
        channel, best = int(entry["channel"]), int(entry["best_timestep"])
        row = st.columns(CONCEPT_COLUMNS)
        row[0].write(f"#{rank + 1}")
        row[1].write(str(channel) + ("" if view.rows.get(channel, {}).get("active") else " (inactive)"))
        row[2].write(_fmt(entry.get("score")))
        row[3].write(f"{best}" + (f" ({_fmt(entry['best_score'])})" if entry.get("best_score") is not None else ""))
        row[4].button(
            f"open {channel} at t = {best}",
            key=f"concept_open_{rank}",
            on_click=_open_at,
            args=(view, channel, min(max(best, 0), view.total_timesteps)),
            disabled=channel not in view.position,
        )
    scores = view.concept_scores(concept, [int(e["channel"]) for e in top[:CONCEPT_CHART_CHANNELS]])
    if scores:
        st.altair_chart(concept_chart(scores, view.total_timesteps), width="stretch")


def concept_chart(scores: dict[int, tuple[np.ndarray, np.ndarray]], total: int) -> alt.Chart:
    """The top channels' concept score per UNet call."""
    frame = pd.concat(
        pd.DataFrame({"t": timesteps, "score": values, "channel": str(channel)})
        for channel, (timesteps, values) in scores.items()
    )
    return (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=_x(total), y=alt.Y("score:Q", title="concept score"), color="channel:N", tooltip=["channel", "t", "score"]
        )
        .properties(title=f"concept score per timestep (top {len(scores)})", height=220)
    )


# --- page ----------------------------------------------------------------------------------------------


def main() -> None:
    st.set_page_config(page_title="ddr inspector", layout="wide")
    if "experiment_dir" not in st.session_state:
        st.session_state["experiment_dir"] = _argument_dir()
    with st.sidebar:
        st.title("ddr inspector")
        experiment_dir = st.text_input("Experiment folder", key="experiment_dir").strip()
        kind = st.radio("Mode", KINDS, format_func=lambda k: KIND_LABELS[k], horizontal=True, key="kind")
    if not experiment_dir or not Path(experiment_dir).is_dir():
        st.info(
            "Open an experiment: `ddr inspect [overrides]`, or enter its folder "
            "(`<data_root>/experiments/<name>`) in the sidebar."
            + (f" `{experiment_dir}` is not a folder." if experiment_dir else "")
        )
        return
    reason = available_kinds(experiment_dir)[kind]
    if reason is not None:
        st.info(f"No {KIND_LABELS[kind].lower()} to show: {reason}.")
        return
    view = load_view(experiment_dir, kind)
    key = _channel_key(kind)
    with st.sidebar:
        only_active = st.checkbox(f"only active ({len(view.active_channels)} of {len(view.order)})", key="only_active")
        options = view.active_channels if only_active and view.active_channels else view.order
        if st.session_state.get(key) not in options:
            st.session_state[key] = _first_channel(view, options)
        st.selectbox(
            SINGULAR[kind],
            options,
            format_func=lambda c: f"{c}" + ("" if view.rows[c]["active"] else " (inactive)"),
            key=key,
        )
        prev, nxt = st.columns(2)
        prev.button("◀ previous", on_click=_step_channel, args=(view, -1), key="prev", width="stretch")
        nxt.button("next ▶", on_click=_step_channel, args=(view, 1), key="next", width="stretch")
        st.text_input("Search by id", key="search", on_change=_search, args=(view,), placeholder="e.g. 12")
        if st.session_state.get("search_error"):
            st.warning(st.session_state["search_error"])
        st.caption(f"{experiment_dir}  \nbuilt {view.index.get('built_at', '?')}")

    channel = view.channel(int(st.session_state[key]))
    if st.session_state.get("t_for") != (kind, channel.channel):
        st.session_state["t_for"] = (kind, channel.channel)
        st.session_state["t"] = _default_t(channel)
    row = channel.row
    st.header(f"{SINGULAR[kind]} {channel.channel}")
    span = f"active for t in [{row['active_t'][0]}, {row['active_t'][1]}]" if row.get("active_t") else "inactive"
    peaks = ", ".join(str(p) for p, _ in channel.peaks) or "none"
    st.caption(f"{span} · peaks at t = {peaks} · {len(view.timesteps)} captured UNet calls")
    m = st.columns(4)
    m[0].metric("peak top-k frequency", _fmt(row.get("peak_frequency")))
    m[1].metric("max activation", _fmt(row.get("max_activation")))
    m[2].metric("priors", row.get("n_priors", 0))
    m[3].metric("deep dreams", row.get("n_dreams", 0))

    controls = st.columns([3, 2])
    with controls[0]:
        t = st.slider("Timestep t", 0, view.total_timesteps, key="t")
    with controls[1]:
        st.selectbox(
            "Jump to a timestep with results",
            channel.result_timesteps(),
            index=None,
            placeholder="captured calls, dream targets, peaks",
            key="jump_t",
            on_change=_jump_t,
        )
    if channel.peaks:
        buttons = st.columns(max(6, len(channel.peaks) + 1))
        buttons[0].markdown("**jump to a peak:**")
        for i, (peak, height) in enumerate(channel.peaks):
            buttons[i + 1].button(f"t = {peak} ({height:.2f})", key=f"peak_{i}", on_click=_set_t, args=(peak,))

    left, right = st.columns(2)
    left.altair_chart(profile_chart(channel, view.total_timesteps, t), width="stretch")
    right.altair_chart(max_activation_chart(channel, view.total_timesteps, t), width="stretch")

    tabs = st.tabs(["Deep dreams", "Dataset examples", "Priors", "Channel overview", "Concepts"])
    with tabs[0]:
        dreams_tab(view, channel, t)
    with tabs[1]:
        examples_tab(view, channel, t)
    with tabs[2]:
        priors_tab(view, channel)
    with tabs[3]:
        overview_tab(view)
    with tabs[4]:
        concepts_tab(view)


main()
