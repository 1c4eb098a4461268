"""The latent explorer: one self-contained interactive HTML page per movie (Bokeh, no server).

The page shows the scatter of every sampled window in latent space (z1 against z2, or
against the angle when the model has one latent), coloured by frame, species or the
frame's order parameter; hovering a point shows the window and its decoding by the rVAE;
a frame slider highlights the windows of one frame; clicking a point draws its
trajectory's latents against frame. BokehJS is inlined, so the file opens offline and in
the Snakemake report.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import add_settings_arguments, settings_from_args
from .errors import InputError
from .io import atomic_output, open_zarr

log = logging.getLogger(__name__)

DEFAULT_MAX_POINTS = 1500
WINDOW_PIXELS = 64  # hover images are upscaled to this size (nearest neighbour) to be seen


def _png(image: np.ndarray, low: float, high: float) -> str:
    """A window as a data-URI PNG, grey levels scaled from [low, high]."""
    from PIL import Image

    scale = 255.0 / (high - low) if high > low else 0.0
    grey = np.clip((np.nan_to_num(image, nan=low) - low) * scale, 0, 255).astype(np.uint8)
    factor = max(1, WINDOW_PIXELS // max(grey.shape))
    grey = np.kron(grey, np.ones((factor, factor), np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def latent_table(latents, patches) -> pd.DataFrame:
    """One row per window present in the latents: particle, frame, obs (patch index), z*, angle.

    Parameters
    ----------
    latents : xarray.Dataset
        ``latents.zarr`` (``angle(particle, frame)``, ``z(particle, frame, latent)``).
    patches : xarray.Dataset
        ``patches.zarr`` (``particle(obs)``, ``frame(obs)``).
    """
    z = latents["z"].transpose("particle", "frame", "latent").values
    # A window is present where it has latents; its angle is NaN for isotropic particles.
    pi, fi = np.nonzero(np.isfinite(z).any(axis=2))
    flat = pd.DataFrame({"particle": latents["particle"].values[pi], "frame": latents["frame"].values[fi],
                         "angle": latents["angle"].transpose("particle", "frame").values[pi, fi]})
    for k in range(z.shape[2]):
        flat[f"z{k + 1}"] = z[pi, fi, k]
    if "cls" in latents and "particle" in latents["cls"].dims:
        flat["species"] = latents["cls"].to_series().reindex(flat["particle"]).to_numpy()
    obs = pd.DataFrame({"particle": patches["particle"].values, "frame": patches["frame"].values,
                        "obs": np.arange(patches.sizes["obs"])}).drop_duplicates(["particle", "frame"])
    return flat.merge(obs, on=["particle", "frame"], how="inner").reset_index(drop=True)


def build_page(
    table: pd.DataFrame,
    windows: np.ndarray,
    decodings: np.ndarray,
    *,
    order: pd.Series | None = None,
    title: str = "latent explorer",
) -> str:
    """The explorer's HTML for the sampled rows of ``table`` and their windows / decodings.

    Parameters
    ----------
    table : DataFrame
        Rows of :func:`latent_table` (all windows, used for the trajectories' time series);
        a boolean column ``shown`` marks the rows drawn in the scatter, in the order of
        ``windows`` and ``decodings``.
    windows, decodings : ndarray
        ``(n_shown, wy, wx)`` window images and their decodings.
    order : Series, optional
        An order parameter per frame (index: frame) to colour by.
    """
    from bokeh.embed import file_html
    from bokeh.layouts import column, row
    from bokeh.models import (
        ColorBar,
        ColumnDataSource,
        CustomJS,
        Div,
        HoverTool,
        LinearColorMapper,
        Select,
        Slider,
    )
    from bokeh.palettes import Viridis256
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    shown = table[table["shown"]].reset_index(drop=True)
    latent_cols = [c for c in table.columns if c.startswith("z") and c[1:].isdigit()]
    y_col = "z2" if "z2" in latent_cols else "angle" if shown["angle"].notna().any() else "frame"
    low, high = np.nanpercentile(np.concatenate([windows.ravel(), decodings.ravel()]), [1, 99])
    data: dict[str, Any] = {
        "x": shown["z1"].to_numpy(float), "y": shown[y_col].to_numpy(float),
        "particle": shown["particle"].to_numpy(int), "frame": shown["frame"].to_numpy(int),
        "angle_deg": np.degrees(shown["angle"].to_numpy(float)),
        "window": [_png(w, low, high) for w in windows],
        "decoding": [_png(d, low, high) for d in decodings],
        "alpha": np.full(len(shown), 0.8),
    }
    colour_by = {"frame": shown["frame"].to_numpy(float)}
    if "species" in shown and shown["species"].notna().any():
        colour_by["species"] = shown["species"].to_numpy(float)
    if order is not None and len(order):
        colour_by[str(order.name or "order parameter")] = order.reindex(shown["frame"]).to_numpy(float)
    for key, values in colour_by.items():
        data[f"c_{key}"] = values
    data["colour"] = data["c_frame"]
    source = ColumnDataSource(data, name="points")
    mapper = LinearColorMapper(palette=Viridis256, low=float(np.nanmin(data["colour"])),
                               high=float(np.nanmax(data["colour"])) + 1e-9, nan_color="lightgrey")

    scatter = figure(width=560, height=480, title=f"{title}: z1 vs {y_col}", name="latent_scatter",
                     tools="pan,wheel_zoom,box_zoom,reset,tap", x_axis_label="z1",
                     y_axis_label=y_col if y_col != "angle" else "angle (rad)")
    points = scatter.scatter("x", "y", source=source, size=7, fill_alpha="alpha", line_alpha="alpha",
                             color={"field": "colour", "transform": mapper})
    scatter.add_layout(ColorBar(color_mapper=mapper, title="colour"), "right")
    scatter.add_tools(HoverTool(renderers=[points], tooltips="""
        <div>
          <div>particle @particle, frame @frame, angle @angle_deg{0.0}&deg;</div>
          <div style="display:flex;gap:6px">
            <figure style="margin:0"><img src="@window" width="64" height="64" alt="window">
              <figcaption>window</figcaption></figure>
            <figure style="margin:0"><img src="@decoding" width="64" height="64" alt="decoding">
              <figcaption>decoding</figcaption></figure>
          </div>
        </div>"""))

    every = table.sort_values(["particle", "frame"])
    trajectories = ColumnDataSource({"particle": every["particle"].to_numpy(int),
                                     "frame": every["frame"].to_numpy(int),
                                     **{c: every[c].to_numpy(float) for c in latent_cols}}, name="trajectories")
    picked = ColumnDataSource({"frame": [], **{c: [] for c in latent_cols}}, name="picked")
    series = figure(width=560, height=480, title="trajectory: click a point", name="trajectory_series",
                    x_axis_label="frame", y_axis_label="latent")
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for k, c in enumerate(latent_cols):
        series.line("frame", c, source=picked, color=palette[k % len(palette)], legend_label=c, line_width=2)
    series.legend.location = "top_left"

    source.selected.js_on_change("indices", CustomJS(args={"src": source, "all": trajectories, "out": picked,
                                                               "fig": series, "cols": latent_cols}, code="""
        const i = src.selected.indices;
        if (i.length == 0) { return; }
        const p = src.data.particle[i[0]];
        const d = {frame: []};
        for (const c of cols) { d[c] = []; }
        for (let k = 0; k < all.data.particle.length; k++) {
            if (all.data.particle[k] != p) { continue; }
            d.frame.push(all.data.frame[k]);
            for (const c of cols) { d[c].push(all.data[c][k]); }
        }
        out.data = d;
        fig.title.text = "trajectory of particle " + p + " (" + d.frame.length + " frames)";
    """))
    frames = shown["frame"]
    slider = Slider(start=int(frames.min()), end=int(max(frames.max(), frames.min() + 1)), value=int(frames.min()),
                    step=1, title="highlight frame", width=560, name="frame_slider")
    slider.js_on_change("value", CustomJS(args={"src": source}, code="""
        const f = cb_obj.value;
        const a = src.data.frame.map((v) => v == f ? 1.0 : 0.08);
        src.data = Object.assign({}, src.data, {alpha: a});
    """))
    select = Select(title="colour by", value="frame", options=list(colour_by), width=200)
    select.js_on_change("value", CustomJS(args={"src": source, "mapper": mapper}, code="""
        const v = src.data["c_" + cb_obj.value];
        const finite = v.filter((x) => Number.isFinite(x));
        mapper.low = Math.min(...finite);
        mapper.high = Math.max(...finite) + 1e-9;
        src.data = Object.assign({}, src.data, {colour: v});
    """))
    note = Div(text=f"<b>{title}</b>: {len(shown)} of {len(table)} windows shown. Hover a point for its "
                    "window and decoding; click it for its trajectory; the slider highlights one frame.")
    layout = column(note, row(select, slider), row(scatter, series))
    return file_html(layout, INLINE, title=title)


def write_explorer(
    movie_dir: str | Path,
    model_path: str | Path,
    output: str | Path,
    *,
    max_points: int = DEFAULT_MAX_POINTS,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Write the explorer page of one movie's results.

    Parameters
    ----------
    movie_dir : path-like
        ``results/{movie}`` with ``latents.zarr`` and ``patches.zarr`` (``dynamics.zarr``
        adds the order-parameter colouring).
    model_path : path-like
        The rVAE checkpoint that encoded the latents (decodes the hovered windows).
    output : path-like
        The HTML file.
    max_points : int
        At most this many windows in the scatter (a seeded random sample).
    """
    from .rvae import load_model

    movie_dir = Path(movie_dir)
    latents = open_zarr(movie_dir / "latents.zarr", required=["angle", "z"], what="latents store")
    patches = open_zarr(movie_dir / "patches.zarr", required=["window", "particle", "frame"], what="patches store")
    table = latent_table(latents, patches)
    if table.empty:
        raise InputError(f"{movie_dir / 'latents.zarr'}: no window has latents to explore")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(table), size=min(int(max_points), len(table)), replace=False))
    table["shown"] = False
    table.loc[pick, "shown"] = True
    obs = table.loc[table["shown"], "obs"].to_numpy()
    windows = np.asarray(patches["window"].values[obs], np.float32)
    model = load_model(model_path)
    decodings = np.asarray(model.reconstruct(windows, device=device), np.float32)
    order = None
    if (movie_dir / "dynamics.zarr").exists():
        dyn = open_zarr(movie_dir / "dynamics.zarr", what="dynamics store")
        if "S_n" in dyn and dyn["S_n"].dims == ("frame",):
            order = dyn["S_n"].to_series().rename("S_n")
    html = build_page(table, windows, decodings, order=order, title=f"{movie_dir.name} latent explorer")
    with atomic_output(output) as tmp:
        tmp.write_text(html, encoding="utf-8")
    log.info("wrote %s (%d of %d windows, %.1f MB)", output, len(obs), len(table), len(html) / 1e6)
    return Path(output)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("movie_dir", help="results/{movie}: holds latents.zarr, patches.zarr (and dynamics.zarr)")
    parser.add_argument("--model", required=True, help="the rVAE checkpoint that encoded the latents")
    parser.add_argument("-o", "--output", required=True, help="the HTML page to write")
    parser.add_argument("--device", default="cpu", help="device for decoding (cpu, cuda, auto)")
    add_settings_arguments(parser, "explorer")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, "explorer")
    write_explorer(args.movie_dir, args.model, args.output, max_points=int(settings["max_points"]),
                   seed=int(settings["seed"]), device=args.device)
    return 0


COMMANDS = {"explorer": (configure, run)}
