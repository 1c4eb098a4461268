"""The latent explorer page: built from the workflow's own outputs, opened in a real headless
Chromium (DevTools protocol): it renders without console errors within the target time,
hovering a point shows its window and decoding, clicking it draws its trajectory."""

from __future__ import annotations

import time

import numpy as np
import pytest
import xarray as xr
from _browser import Browser, require_chromium
from _workflow import shared_small_run

from rvae_tools.explorer import latent_table

pytestmark = pytest.mark.slow
LOAD_TARGET_S = 3.0

FIND_VIEW = """
window.__views = () => (Bokeh.index instanceof Map ? [...Bokeh.index.values()] : Object.values(Bokeh.index));
window.__findView = (name) => {
  const walk = (v) => { if (v.model && v.model.name === name) return v;
    for (const c of (v.child_views || [])) { const f = walk(c); if (f) return f; } return null; };
  for (const v of __views()) { const f = walk(v); if (f) return f; }
  return null; };
"""
# where point k of the scatter is drawn, in page pixels
POINT_XY = """(() => { const v = __findView('latent_scatter');
  const src = Bokeh.documents[0].get_model_by_name('points');
  const r = v.canvas_view.el.getBoundingClientRect();
  return [r.left + v.frame.x_scale.compute(src.data.x[K]), r.top + v.frame.y_scale.compute(src.data.y[K])]; })()"""
# the images visible on the page (tooltips live in shadow roots)
VISIBLE_IMAGES = """(() => { const out = [];
  const walk = (root) => { for (const el of root.querySelectorAll('*')) {
     if (el.tagName === 'IMG' && el.src.startsWith('data:image/png')) {
       const r = el.getBoundingClientRect(); if (r.width > 0 && r.height > 0) out.push(el.alt); }
     if (el.shadowRoot) walk(el.shadowRoot); } };
  walk(document); return out; })()"""


def test_latent_table_pairs_every_present_latent_with_its_window():
    # latents and patches built here by hand, not by the pipeline
    latents = xr.Dataset(
        {"angle": (("particle", "frame"), [[0.1, np.nan, 0.3], [np.nan, 0.5, 0.6]]),
         "z": (("particle", "frame", "latent"), np.arange(12, dtype=float).reshape(2, 3, 2))},
        coords={"particle": [4, 9], "frame": [0, 1, 2], "latent": [0, 1]})
    patches = xr.Dataset({"window": (("obs", "wy", "wx"), np.zeros((4, 2, 2)))},
                         coords={"particle": ("obs", [9, 4, 9, 4]), "frame": ("obs", [1, 0, 2, 2])})
    table = latent_table(latents, patches).sort_values(["particle", "frame"])
    assert table[["particle", "frame", "obs"]].values.tolist() == [[4, 0, 1], [4, 2, 3], [9, 1, 0], [9, 2, 2]]
    assert table["z2"].tolist() == [1.0, 5.0, 9.0, 11.0]
    # Spheres: no angle, but their shape latents are there to explore; a window without z is absent.
    z = np.arange(12, dtype=float).reshape(2, 3, 2)
    z[1, 2] = np.nan
    spheres = latents.assign(angle=latents["angle"] * np.nan, z=(("particle", "frame", "latent"), z))
    table = latent_table(spheres, patches).sort_values(["particle", "frame"])
    assert table[["particle", "frame", "obs"]].values.tolist() == [[4, 0, 1], [4, 2, 3], [9, 1, 0]]
    assert table["angle"].isna().all()


def test_explorer_loads_in_headless_chromium_and_hover_shows_the_window(tmp_path_factory):
    chromium = require_chromium()
    run = shared_small_run(tmp_path_factory)
    page = run / "results" / "demo" / "explorer.html"
    assert page.exists() and page.stat().st_size < 20e6
    latents = xr.open_zarr(run / "results" / "demo" / "latents.zarr")
    browser = Browser(chromium)
    try:
        start = time.monotonic()
        browser.call("Page.navigate", url=page.resolve().as_uri())
        browser.wait_for("window.Bokeh !== undefined && Bokeh.index !== undefined", timeout=20)
        browser.evaluate(FIND_VIEW)
        browser.wait_for("(() => { const v = __findView('latent_scatter'); return v !== null && "
                         "v.frame.bbox.width > 0; })()", timeout=20)
        seconds = time.monotonic() - start
        print(f"explorer rendered in headless Chromium in {seconds:.2f} s")
        assert seconds < LOAD_TARGET_S
        n_points = browser.evaluate("Bokeh.documents[0].get_model_by_name('points').data.x.length")
        assert n_points == min(1500, int(latents["angle"].notnull().sum()))
        assert browser.evaluate(VISIBLE_IMAGES) == []  # no tooltip before a hover

        x, y = browser.evaluate(POINT_XY.replace("K", "0"))
        browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        browser.wait_for(VISIBLE_IMAGES + ".length >= 2", timeout=5)
        assert sorted(browser.evaluate(VISIBLE_IMAGES)) == ["decoding", "window"]
        shot = browser.screenshot(tmp_path_factory.mktemp("explorer") / "hovered.png")
        assert shot.stat().st_size > 10_000

        for kind in ("mousePressed", "mouseReleased"):
            browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        browser.wait_for("Bokeh.documents[0].get_model_by_name('picked').data.frame.length > 0", timeout=5)
        particle = browser.evaluate("(() => { const s = Bokeh.documents[0].get_model_by_name('points');"
                                    " return s.data.particle[s.selected.indices[0]]; })()")
        frames = browser.evaluate("Array.from(Bokeh.documents[0].get_model_by_name('picked').data.frame)")
        expected = latents["angle"].sel(particle=particle).dropna("frame")["frame"].values.tolist()
        assert frames == expected  # the clicked point's whole trajectory

        # the slider highlights the windows of its frame and dims the others
        browser.evaluate("Bokeh.documents[0].get_model_by_name('frame_slider').value = 3")
        alpha, shown_frames = browser.evaluate(
            "(() => { const d = Bokeh.documents[0].get_model_by_name('points').data;"
            " return [Array.from(d.alpha), Array.from(d.frame)]; })()")
        assert [a == 1.0 for a in alpha] == [f == 3 for f in shown_frames]
        assert browser.errors() == []
    finally:
        browser.close()
