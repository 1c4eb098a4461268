"""Atomic outputs and contract checks of the shared I/O helpers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rvae_tools.errors import InputError
from rvae_tools.io import (
    atomic_output,
    open_zarr,
    read_json,
    read_table,
    remove_stale_temporaries,
    scratch_path,
    table_metadata,
    write_json,
    write_table,
    write_zarr,
    write_zarr_parts,
)
from rvae_tools.provenance import provenance_attrs


def test_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    target = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.mkdir()
        (tmp / "part").write_text("half")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    ds = xr.Dataset({"image": (("frame", "y", "x"), np.zeros((2, 3, 4), np.float32))})
    write_zarr(ds, target)
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.mkdir()
        raise RuntimeError("interrupted")
    assert open_zarr(target, required=["image"])["image"].shape == (2, 3, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_zarr_round_trip_with_provenance(tmp_path):
    image = np.random.default_rng(0).random((3, 5, 6), dtype=np.float32)
    ds = xr.Dataset({"image": (("frame", "y", "x"), image)}, attrs={"pixel_size": np.float64(2.5)})
    write_zarr(ds, tmp_path / "m.zarr", provenance=provenance_attrs(settings={"a": 1}, seed=4, stage="test"))
    back = open_zarr(tmp_path / "m.zarr", required=["image"])
    np.testing.assert_array_equal(back["image"].values, image)
    assert back.attrs["pixel_size"] == 2.5
    assert back.attrs["seed"] == 4 and back.attrs["stage"] == "test"
    assert len(back.attrs["config_hash"]) == 16
    assert "numpy" in back.attrs["library_versions"]


def test_open_zarr_names_missing_variable(tmp_path):
    write_zarr(xr.Dataset({"a": ("x", np.arange(3))}), tmp_path / "s.zarr")
    with pytest.raises(InputError, match=r"s\.zarr: store lacks variable\(s\) image"):
        open_zarr(tmp_path / "s.zarr", required=["image"])
    with pytest.raises(InputError, match="not found"):
        open_zarr(tmp_path / "nothing.zarr")
    (tmp_path / "junk.zarr").write_text("not a store")
    with pytest.raises(InputError, match="cannot be read"):
        open_zarr(tmp_path / "junk.zarr")


def test_table_round_trip_and_missing_columns(tmp_path):
    df = pd.DataFrame({"frame": [0, 1], "x": [1.5, 2.5], "y": [3.0, 4.0]})
    write_table(df, tmp_path / "t.parquet", metadata={"seed": 3})
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.parquet", required=["frame", "x"]), df)
    assert table_metadata(tmp_path / "t.parquet") == {"seed": 3}
    with pytest.raises(InputError, match=r"lacks column\(s\) particle"):
        read_table(tmp_path / "t.parquet", required=["frame", "particle"])
    (tmp_path / "bad.parquet").write_text("garbage")
    with pytest.raises(InputError, match="cannot be read as a Parquet"):
        read_table(tmp_path / "bad.parquet")


def test_json_round_trip(tmp_path):
    write_json({"a": np.float32(1.5), "b": np.arange(2)}, tmp_path / "x.json")
    assert read_json(tmp_path / "x.json") == {"a": 1.5, "b": [0, 1]}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_killed_write_leftovers_are_removed_by_the_next_write(tmp_path):
    """A writer killed with SIGKILL leaves its temporary; the next write of that path removes
    it (its PID is dead), while a live writer's temporary and other files are kept."""
    import os
    import signal
    import subprocess
    import sys

    target = tmp_path / "out.zarr"
    writer = (
        "import sys, time\n"
        "from rvae_tools.io import atomic_output\n"
        "with atomic_output(sys.argv[1]) as tmp:\n"
        "    tmp.mkdir(); (tmp / 'part').write_text('half'); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(f".out.zarr.tmp-{proc.pid}-")
    # A killed rename leaves the previous output moved aside; a live writer's temporary.
    (tmp_path / f".out.zarr.old-{proc.pid}-0123abcd").mkdir()
    live = tmp_path / f".out.zarr.tmp-{os.getpid()}-89abcdef"
    live.mkdir()
    other = tmp_path / ".other.zarr.tmp-1-0123abcd"
    other.mkdir()

    write_json({"a": 1}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out.zarr"])
    assert read_json(target) == {"a": 1}


def _whole(n=7):
    rng = np.random.default_rng(3)
    return xr.Dataset(
        {"a": (("particle", "frame"), rng.normal(size=(n, 5)).astype(np.float32), {"units": "rad"}),
         "b": (("particle",), np.arange(n) * 2)},
        coords={"particle": np.arange(n) + 10, "frame": np.arange(5),
                "name": ("particle", np.array([f"p{i}" * (i % 3 + 1) for i in range(n)], dtype=object))},
        attrs={"what": "test", "order": [2, 1]})


def test_parts_written_along_a_dim_make_the_whole_store(tmp_path):
    whole = _whole()
    parts = (whole.isel(particle=slice(lo, lo + 3)) for lo in range(0, 7, 3))  # 3 + 3 + 1 particles
    write_zarr_parts(parts, tmp_path / "parts.zarr", append_dim="particle",
                     encoding=lambda first: {"a": {"chunks": (3, 5)}},
                     provenance={"stage": "test"})
    back = open_zarr(tmp_path / "parts.zarr").load()
    assert back.attrs["stage"] == "test" and back.attrs["what"] == "test" and list(back.attrs["order"]) == [2, 1]
    assert back["a"].attrs["units"] == "rad"
    expected = whole.copy()
    back.attrs = expected.attrs = {}
    xr.testing.assert_identical(back, expected)  # values, dtypes (strings too), coords and variable attrs


def test_a_failing_part_leaves_no_store(tmp_path):
    whole = _whole()

    def parts():
        yield whole.isel(particle=slice(0, 3))
        raise RuntimeError("chunk 2 failed")

    with pytest.raises(RuntimeError, match="chunk 2"):
        write_zarr_parts(parts(), tmp_path / "parts.zarr", append_dim="particle")
    assert list(tmp_path.iterdir()) == []


def test_scratch_is_removed_and_named_for_stale_cleanup(tmp_path):
    target = tmp_path / "latents.zarr"
    with pytest.raises(KeyboardInterrupt), scratch_path(target) as scratch:
        (scratch / "windows.zarr").mkdir()
        assert scratch.parent == tmp_path and scratch.name.startswith(".latents.zarr.tmp-")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # A scratch folder a killed process left (a PID that is not running) goes with the next write.
    left = tmp_path / ".latents.zarr.tmp-999999999-abcdef12"
    left.mkdir()
    assert remove_stale_temporaries(target) == [left] and not left.exists()
