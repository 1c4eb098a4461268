# Shared helpers: config validation (before any rule runs), per-stage settings, paths.
import json
import os
import shlex
import sys

from rvae_tools.config import movie_entry, stage_settings, validate_config
from rvae_tools.errors import InputError

try:
    validate_config(config, source="config")
except InputError as _error:
    sys.exit(f"rvae-tools: invalid configuration: {_error}")

RESULTS = config["results"]
MOVIES = list(config["movies"])
SIMULATED = [name for name in MOVIES if "simulate" in config["movies"][name]]


def settings(section):
    """params: function giving a stage the JSON of its settings for this movie."""

    def _settings(wildcards):
        return json.dumps(stage_settings(config, section, wildcards.movie), sort_keys=True)

    return _settings


def input_mb(input):
    """Size of a job's inputs in MB, counting what is inside Zarr stores (directories),
    which Snakemake's own input.size_mb counts as empty."""
    total = 0
    for path in input:
        if os.path.isdir(path):
            for root, _, files in os.walk(path):
                total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
        elif os.path.exists(path):
            total += os.path.getsize(path)
    return total / 1e6


def _sized_inputs(input, only):
    return input if only is None else [input[name] for name in only]


def mem_mb_from_input(base, per_input_mb, only=None):
    """resources: memory that grows with the size of the inputs on disk (MB); ``only`` names
    the inputs that drive it (default: all)."""
    return lambda wildcards, input: int(base + per_input_mb * input_mb(_sized_inputs(input, only)))


def runtime_from_input(base, per_input_mb, only=None):
    """resources: runtime in minutes that grows with the size of the inputs on disk."""
    return lambda wildcards, input: int(base + per_input_mb * input_mb(_sized_inputs(input, only)))


def reader_options(wildcards):
    """JSON of a movie's reader options (channel, invert, crop, frames, units)."""
    entry = movie_entry(config, wildcards.movie)
    entry.pop("simulate", None)
    entry.pop("path", None)
    return json.dumps(entry, sort_keys=True)


def movie_source(wildcards):
    """The raw movie a movie's ingest reads: the simulator's TIFF or the user's path."""
    if wildcards.movie in SIMULATED:
        return f"{RESULTS}/{wildcards.movie}/raw/movie.tif"
    return config["movies"][wildcards.movie]["path"]


def final_outputs():
    """The targets of `rule all`, for every movie. Its dynamics and every figure pull in
    every earlier stage. (FIGURES comes from dynamics.smk, included before `rule all`.)"""
    outputs = expand(f"{RESULTS}/{{movie}}/dynamics.zarr", movie=MOVIES)
    stems = [stem for stage_stems in FIGURES.values() for stem in stage_stems]
    outputs += expand(f"{RESULTS}/{{movie}}/figures/{{stem}}.png", movie=MOVIES, stem=stems)
    return outputs


# ----------------------------------------------------------------- segmentation

def _segment_settings(movie):
    return stage_settings(config, "segment", movie)


def _movie_pattern(names):
    # A pattern that matches nothing when the list is empty, so the rule never applies.
    return "|".join(names) if names else "(?!x)x"


SEGMENT_UNET = [m for m in MOVIES if _segment_settings(m)["method"] == "unet"]
SEGMENT_LOCATE = [m for m in MOVIES if _segment_settings(m)["method"] == "locate"]
SEGMENT_TRAIN = [m for m in SEGMENT_UNET if not _segment_settings(m)["checkpoint"]]


def segmenter_checkpoint(wildcards):
    """The checkpoint a unet movie segments with: its own, or the configured shared one."""
    shared = _segment_settings(wildcards.movie)["checkpoint"]
    return shared if shared else f"{RESULTS}/models/segmenter/{wildcards.movie}.pt"


def segmenter_training_input(wildcards):
    """Pseudo-labels are found in the movie itself; other sources need no input file."""
    if _segment_settings(wildcards.movie)["train"]["source"] == "pseudo":
        return {"movie": f"{RESULTS}/{wildcards.movie}/movie.zarr"}
    return {}


def segmenter_training_args(wildcards):
    """--input for pseudo-labels, --simulate-settings for a simulated movie."""
    args = []
    if _segment_settings(wildcards.movie)["train"]["source"] == "pseudo":
        args += ["--input", f"{RESULTS}/{wildcards.movie}/movie.zarr"]
    if wildcards.movie in SIMULATED:
        args += ["--simulate-settings", json.dumps(stage_settings(config, "simulate", wildcards.movie), sort_keys=True)]
    return " ".join(shlex.quote(a) for a in args)


# ----------------------------------------------------------------- rVAE training

def _rvae_pooled():
    return bool(stage_settings(config, "rvae")["pooled"])


def rvae_model_path(wildcards):
    """The model that a movie's encode step reads (the pooled model, or the movie's own)."""
    if _rvae_pooled():
        return f"{RESULTS}/models/rvae/pooled/model.pt"
    return f"{RESULTS}/models/rvae/{wildcards.movie}/model.pt"


def _rvae_train_patches(wildcards):
    if wildcards.scope == "pooled":
        return expand(f"{RESULTS}/{{movie}}/patches.zarr", movie=MOVIES)
    return [f"{RESULTS}/{wildcards.scope}/patches.zarr"]


def rvae_train_mem_mb(wildcards, input):
    """The trainer keeps at most rvae.memory_mb of windows in memory and streams the rest."""
    movie = None if wildcards.scope == "pooled" else wildcards.scope
    window_mb = stage_settings(config, "rvae", movie)["memory_mb"]
    return int(1500 + min(window_mb, 8 * input_mb(input.patches)))


def _rvae_train_settings(wildcards):
    # The pooled model has no movie wildcard, so it takes the config's rvae section as is;
    # a per-movie model takes that movie's overrides.
    movie = None if wildcards.scope == "pooled" else wildcards.scope
    return json.dumps(stage_settings(config, "rvae", movie), sort_keys=True)
