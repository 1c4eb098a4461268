# Shared helpers: config validation (before any rule runs), per-stage settings, paths.
import copy
import json
import os
import re
import shlex
import sys

from rvae_tools.config import check_config, class_movies, labelled_model, movie_entry, movie_frames, read_config_file, stage_settings, validate_config, without_workflow_keys
from rvae_tools.errors import InputError


def _checked_config():
    """Validate the config before any rule runs; errors name the file that holds the key.

    Each config file is read strictly (empty file, duplicate key, YAML line and column) and
    validated on its own, then the merged config. Movies listed in a file given on the
    command line (--configfile) replace the workflow's default list instead of being merged
    into it: a user's config is the user's, the demo is not added to it."""
    user = workflow.config_settings.overwrite_config or {}
    for path in workflow.configfiles:
        validate_config(read_config_file(path), source=str(path))
    if "movies" in user:
        config["movies"] = copy.deepcopy(user["movies"])
    source = " + ".join(map(str, workflow.configfiles)) or "config"
    validate_config(config, source=source)
    if workflow.is_main_process:
        # The movies' headers and, for local jobs, the device (a cluster's submit host
        # may have no GPU while its compute nodes do).
        check_config(config, source=source, device=workflow.local_exec)


try:
    _checked_config()
except InputError as _error:
    sys.exit(f"rvae-tools: invalid configuration: {_error}")

RESULTS = config["results"]
MOVIES = list(config["movies"])
SIMULATED = [name for name in MOVIES if "simulate" in config["movies"][name]]


def settings(section):
    """params: function giving a stage the JSON of its settings for this movie (without the
    keys that only say how the workflow splits the stage into jobs, such as segment.frame_chunk:
    switching chunking on must not rerun the stage's other rules)."""

    def _settings(wildcards):
        return json.dumps(without_workflow_keys(section, stage_settings(config, section, wildcards.movie)), sort_keys=True)

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
    """The targets of the `all` rule (the default target), which are every declared output
    of every stage, for every movie (and model scope) it applies to, so that a missing
    output (a store deleted, a killed --forcerun) is always rebuilt rather than reported up
    to date because the files downstream of it are still there. Called after every rule is
    defined."""
    from itertools import product

    from snakemake.io import apply_wildcards, get_wildcard_names, regex_from_filepattern

    values = {"movie": MOVIES, "scope": ["pooled"] if _rvae_pooled() else MOVIES}
    # Rules whose movie wildcard is not constrained to the movies they apply to.
    applies_to = {"simulate": SIMULATED}
    outputs = []
    for stage in workflow.rules:
        if stage.name == "all":
            continue
        for pattern in map(str, stage.output):
            names = sorted(get_wildcard_names(pattern))
            if not set(names) <= set(values):
                continue  # a wildcard whose values only the rule itself knows
            choices = [applies_to.get(stage.name, values[n]) if n == "movie" else values[n] for n in names]
            regex = re.compile(regex_from_filepattern(pattern))
            for combo in product(*choices):
                path = apply_wildcards(pattern, dict(zip(names, combo)))
                if regex.fullmatch(path):  # the rule's wildcard constraints: its movies only
                    outputs.append(path)
    return outputs


# ----------------------------------------------------------------- segmentation

def _segment_settings(movie):
    return stage_settings(config, "segment", movie)


def _movie_pattern(names):
    # A pattern that matches nothing when the list is empty, so the rule never applies.
    return "|".join(names) if names else "(?!x)x"


#: Movies of the user (not simulated): inspected first (rule `inspect`), and every setting
#: left at `auto` takes the inspected value (rvae_tools.inspect.resolve_settings).
USER_MOVIES = [m for m in MOVIES if m not in SIMULATED]


def _segment_method(movie):
    """The detector of a movie; `auto` is unet for a simulated movie, classical for a user
    movie (what rvae_tools.inspect.resolve_settings decides in the stage itself)."""
    method = _segment_settings(movie)["method"]
    if method == "auto":
        return "unet" if movie in SIMULATED else "classical"
    return method


def _training_source(movie):
    source = _segment_settings(movie)["train"]["source"]
    if source == "auto":
        return "simulate" if movie in SIMULATED else "pseudo"
    return source


SEGMENT_UNET = [m for m in MOVIES if _segment_method(m) == "unet"]
SEGMENT_LOCATE = [m for m in MOVIES if _segment_method(m) == "locate"]
SEGMENT_CLASSICAL = [m for m in MOVIES if _segment_method(m) == "classical"]
SEGMENT_TRAIN = [m for m in SEGMENT_UNET if not _segment_settings(m)["checkpoint"]]


def _frame_chunk(movie):
    return int(_segment_settings(movie)["frame_chunk"] or 0)


#: U-Net movies segmented in frame chunks (segment.frame_chunk > 0): one `segment_chunk` job
#: per chunk, which a cluster runs in parallel, joined by `segment_gather`; the others in one
#: `segment` job.
SEGMENT_CHUNKED = [m for m in SEGMENT_UNET if _frame_chunk(m) > 0]
SEGMENT_WHOLE = [m for m in SEGMENT_UNET if m not in SEGMENT_CHUNKED]
#: The same for the detectors without a network (classical, locate): `segment_chunk_detector`
#: jobs joined by `segment_gather_detector`, else one `segment_classical`/`segment_locate` job.
SEGMENT_CHUNKED_DETECTOR = [m for m in SEGMENT_CLASSICAL + SEGMENT_LOCATE if _frame_chunk(m) > 0]
SEGMENT_CLASSICAL_WHOLE = [m for m in SEGMENT_CLASSICAL if m not in SEGMENT_CHUNKED_DETECTOR]
SEGMENT_LOCATE_WHOLE = [m for m in SEGMENT_LOCATE if m not in SEGMENT_CHUNKED_DETECTOR]


_FRAME_CHUNKS = {}


def frame_chunks(movie):
    """[(start, stop), ...]: the movie's frames in runs of segment.frame_chunk (the last one
    shorter). The frame count comes from the simulator's settings or the file's header, so the
    chunks are known when the workflow starts, before ingest; read once per movie (every chunk
    job's input, params and resources ask)."""
    if movie not in _FRAME_CHUNKS:
        n, size = movie_frames(config, movie), _frame_chunk(movie)
        _FRAME_CHUNKS[movie] = [(start, min(start + size, n)) for start in range(0, n, size)]
    return _FRAME_CHUNKS[movie]


def _chunk_range(wildcards):
    chunks = frame_chunks(wildcards.movie)
    index = int(wildcards.chunk)
    if index >= len(chunks):
        raise ValueError(f"movie {wildcards.movie} has {len(chunks)} frame chunks; there is no chunk {index}")
    return chunks[index]


def segment_chunk_frames(wildcards):
    """--frames START STOP of one chunk (quoted for the shell)."""
    return shlex.join(str(v) for v in _chunk_range(wildcards))


def segment_chunk_parts(wildcards):
    """The detections tables and probability maps of all of a movie's chunks, in frame order."""
    base = f"{RESULTS}/{wildcards.movie}/segment_chunks"
    chunks = range(len(frame_chunks(wildcards.movie)))
    return {"detections": [f"{base}/{i}.detections.parquet" for i in chunks],
            "probability": [f"{base}/{i}.probability.zarr" for i in chunks]}


def segment_chunk_detections(wildcards):
    """The detections tables of all of a movie's chunks, in frame order (no probability map)."""
    return segment_chunk_parts(wildcards)["detections"]


def chunk_runtime(base, per_input_mb, only=None):
    """resources: minutes for one chunk, the movie's share of runtime_from_input(base, per_input_mb, only)."""

    def _runtime(wildcards, input):
        start, stop = _chunk_range(wildcards)
        share = (stop - start) / frame_chunks(wildcards.movie)[-1][1]
        return int(base + per_input_mb * share * input_mb(_sized_inputs(input, only)))

    return _runtime


def inspect_input(wildcards):
    """A user movie's stages read its inspect.json (settings left at `auto`); a simulated one has none."""
    if wildcards.movie in SIMULATED:
        return {}
    return {"inspect": f"{RESULTS}/{wildcards.movie}/inspect.json"}


def inspect_args(wildcards):
    """--inspect for a user movie's stages (quoted), nothing for a simulated movie."""
    if wildcards.movie in SIMULATED:
        return ""
    path = f"{RESULTS}/{wildcards.movie}/inspect.json"
    return f"--inspect {shlex.quote(path)}"


def inspect_settings(wildcards):
    """The sections whose `auto` values the inspection decides, as the inspect rule records them."""
    return json.dumps({section: without_workflow_keys(section, stage_settings(config, section, wildcards.movie))
                       for section in ("segment", "track", "windows")}, sort_keys=True)


def segmenter_checkpoint(wildcards):
    """The checkpoint a unet movie segments with: its own, or the configured shared one."""
    shared = _segment_settings(wildcards.movie)["checkpoint"]
    return shared if shared else f"{RESULTS}/models/segmenter/{wildcards.movie}.pt"


def segmenter_training_input(wildcards):
    """Pseudo-labels are found in the movie itself; other sources need no input file."""
    inputs = dict(inspect_input(wildcards))
    if _training_source(wildcards.movie) == "pseudo":
        inputs["movie"] = f"{RESULTS}/{wildcards.movie}/movie.zarr"
    return inputs


def segmenter_training_args(wildcards):
    """--input for pseudo-labels, --simulate-settings for a simulated movie."""
    args = []
    if _training_source(wildcards.movie) == "pseudo":
        args += ["--input", f"{RESULTS}/{wildcards.movie}/movie.zarr"]
    if wildcards.movie not in SIMULATED:
        args += ["--inspect", f"{RESULTS}/{wildcards.movie}/inspect.json"]
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
    # a per-movie model takes that movie's overrides. A movie with labels makes it ssrvae
    # unless rvae.model says otherwise (rvae_tools.config.labelled_model).
    movie = None if wildcards.scope == "pooled" else wildcards.scope
    rvae = {**stage_settings(config, "rvae", movie), "model": labelled_model(config, movie)}
    return json.dumps(rvae, sort_keys=True)


def _labelled_movies(wildcards):
    names = MOVIES if wildcards.scope == "pooled" else [wildcards.scope]
    return [name for name in names if config["movies"][name].get("labels")]


def rvae_train_labels(wildcards):
    """The labels files (or folders) of the movies a model trains on."""
    return [config["movies"][name]["labels"] for name in _labelled_movies(wildcards)]


def rvae_train_label_args(wildcards):
    """--movie-labels MOVIE PATH for every labelled movie of the model, quoted for the shell."""
    args = []
    for name in _labelled_movies(wildcards):
        args += ["--movie-labels", name, config["movies"][name]["labels"]]
    return " ".join(shlex.quote(a) for a in args)


def _labels_table(movie):
    """The movie's labels file when it is a table (a folder of labelled images holds no windows of the movie)."""
    labels = config["movies"][movie].get("labels")
    return labels if labels and not os.path.isdir(labels) else None


def class_reference(wildcards):
    """The file the confusion matrix takes its reference classes from: the labels table, else truth.parquet."""
    return _labels_table(wildcards.movie) or f"{RESULTS}/{wildcards.movie}/truth.parquet"


def class_reference_arg(wildcards):
    """--labels PATH or --truth PATH (quoted for the shell)."""
    labels = _labels_table(wildcards.movie)
    flag, path = ("--labels", labels) if labels else ("--truth", class_reference(wildcards))
    return f"{flag} {shlex.quote(path)}"
