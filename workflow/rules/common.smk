# Shared helpers: config validation (before any rule runs), per-stage settings, paths.
import json
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


wildcard_constraints:
    movie="|".join(MOVIES),


def settings(section):
    """params: function giving a stage the JSON of its settings for this movie."""

    def _settings(wildcards):
        return json.dumps(stage_settings(config, section, wildcards.movie), sort_keys=True)

    return _settings


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
    """What `rule all` builds for every movie: its dynamics and every figure, which pull in
    every earlier stage. (FIGURES comes from dynamics.smk, included before `rule all`.)"""
    outputs = expand(f"{RESULTS}/{{movie}}/dynamics.zarr", movie=MOVIES)
    stems = [stem for stage_stems in FIGURES.values() for stem in stage_stems]
    outputs += expand(f"{RESULTS}/{{movie}}/figures/{{stem}}.png", movie=MOVIES, stem=stems)
    return outputs
