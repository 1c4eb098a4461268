"""`snakemake --report report.html` (as the README says) collects every figure with its caption."""

from __future__ import annotations

import pytest
from _workflow import run_snakemake, shared_small_config, shared_small_run

from rvae_tools.figures import figure_stems

pytestmark = pytest.mark.slow


def test_report_holds_every_figure_with_its_caption(tmp_path_factory):
    run = shared_small_run(tmp_path_factory)
    report = run / "report.html"
    run_snakemake(run, shared_small_config(), "--report", str(report))
    html = report.read_text(errors="replace")
    assert len(html) > 10_000
    stems = [stem for stage in figure_stems().values() for stem in stage]
    assert len(stems) >= 18
    for stem in stems:
        assert f"{stem}.png" in html, f"figure {stem} missing from the report"
    # a caption of each kind of stage reaches the report
    for phrase in ("probability", "trajector", "manifold", "transition"):
        assert phrase in html.lower()
