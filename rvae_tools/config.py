"""Configuration: load, validate against the JSON schema, and hand each stage its settings.

The schema lives in ``rvae_tools/schemas/config.schema.yaml`` (``workflow/schemas`` links to
it) and is the single description of every key, its type, range and default. Validation
fills in defaults, so a stage never needs its own fallback values.

A stage's settings are its config section, merged with the per-movie overrides of that
section (``movies.<name>.<section>``), validated again, with ``seed`` filled in from the
top-level ``seed`` unless the section sets its own.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

from .errors import InputError

#: Config sections a stage can ask for with :func:`stage_settings`.
STAGE_SECTIONS = ("simulate", "segment", "track", "windows", "rvae", "dynamics", "figures")

#: Keys of a movie entry that are reader options rather than per-stage overrides.
MOVIE_READER_KEYS = ("path", "simulate", "channel", "invert", "crop", "frames", "pixel_size",
                     "pixel_unit", "frame_interval", "dataset")


def schema_path() -> Path:
    """Path of the packaged config schema."""
    return Path(str(resources.files("rvae_tools") / "schemas" / "config.schema.yaml"))


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The config schema as a dict (parsed once)."""
    return yaml.safe_load(schema_path().read_text())


def _extend_with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _extend_with_defaults(Draft202012Validator)


def _key_path(error, prefix: str = "") -> str:
    parts = ([prefix] if prefix else []) + [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _describe(error, prefix: str = "") -> str:
    """One line saying which key is wrong and what was expected."""
    where = _key_path(error, prefix)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        if error.schema.get("patternProperties") or error.schema.get("additionalProperties") not in (False, None):
            return f"{where}: {error.message}"
        keys = ", ".join(repr(k) for k in extra)
        return f"{where}: unknown key {keys}; expected one of: {', '.join(allowed)}"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{where}: {error.instance!r} is not of type {expected}"
    if error.validator == "enum":
        return f"{where}: {error.instance!r} is not one of {', '.join(map(repr, error.validator_value))}"
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        relation = {
            "minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<",
        }[error.validator]
        return f"{where}: {error.instance!r} is out of range; expected a value {relation} {error.validator_value}"
    if error.validator == "pattern" and "x-expected" in error.schema:
        return f"{where}: {error.instance!r} is not allowed; expected {error.schema['x-expected']}"
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"{where}: {error.message}"


def _validate(instance: Any, schema: dict[str, Any], source: str, prefix: str = "") -> None:
    validator = _DefaultFillingValidator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        # Report the deepest, most specific error first: that is the key the user must fix.
        error = max(errors, key=lambda e: len(e.absolute_path))
        raise InputError(f"{source}: {_describe(error, prefix)}")


def validate_config(config: dict[str, Any] | None, source: str = "config") -> dict[str, Any]:
    """Validate a whole config (in place), filling in defaults.

    Parameters
    ----------
    config : dict
        The parsed config (e.g. Snakemake's ``config``).
    source : str
        Where it came from, for error messages (a file name).

    Returns
    -------
    dict
        The same dict, with defaults filled in.

    Raises
    ------
    InputError
        One line naming the key and what was expected.
    """
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise InputError(f"{source}: the config must be a mapping of keys to values, got {type(config).__name__}")
    _validate(config, load_schema(), source)
    for name, movie in config.get("movies", {}).items():
        has_path, has_sim = "path" in movie, "simulate" in movie
        if has_path == has_sim:
            raise InputError(
                f"{source}: movies.{name}: give exactly one of 'path' (a movie file or folder) "
                f"or 'simulate' (simulator overrides, {{}} for the defaults)"
            )
        for section in STAGE_SECTIONS:
            if section in movie and section != "simulate":
                stage_settings(config, section, name, source=source)
        if has_sim:
            stage_settings(config, "simulate", name, source=source)
    _check_results_folder(config, source)
    return config


def _check_results_folder(config: dict[str, Any], source: str) -> None:
    # Outputs outside the working directory only when the user says so: a typo such as
    # "../results" (or a crafted config) must not write into someone else's folders.
    results = config["results"]
    if config["results_outside_workdir"]:
        return
    inside = os.path.relpath(os.path.abspath(results), os.getcwd())
    if inside == ".." or inside.startswith(".." + os.sep):
        raise InputError(
            f"{source}: results: {results!r} is outside the working directory {os.getcwd()}; "
            "expected a relative path inside it, or set results_outside_workdir: true"
        )


def check_config(config: dict[str, Any], source: str = "config", *, device: bool = True) -> dict[str, Any]:
    """Cross-field checks of a validated config against its movies and this machine.

    Run by ``rvae-tools validate-config`` and at Snakemake start, before any rule, so that a
    config that cannot work stops before the first job (and before Snakemake removes the
    previous outputs of a rule). Checks, per movie: the movie file exists and its frame
    range and crop fit it (read from the file's header, no pixels), ``windows.size`` fits in
    the (cropped) frame, ``windows.source: probability`` has a detector that writes a
    probability map (``segment.method: unet``); and, with ``device``, that the configured
    compute device exists here.

    Returns
    -------
    dict
        Per movie, the frame shape ``(frames, height, width)`` found (None when unknown).

    Raises
    ------
    InputError
        One line naming the file, the movie, the key and what was expected.
    """
    shapes: dict[str, Any] = {}
    for name, movie in config["movies"].items():
        where = f"{source}: movies.{name}"
        windows = stage_settings(config, "windows", name, source=source)
        segment = stage_settings(config, "segment", name, source=source)
        method = segment.get("method")
        if method == "auto":  # as rvae_tools.inspect.resolve_settings and the workflow decide it
            method = "unet" if "simulate" in movie else "classical"
        if windows.get("source") == "probability" and method in ("locate", "classical"):
            raise InputError(
                f"{where}: windows.source: probability needs a probability map, which "
                f"segment.method: {method} does not write; expected segment.method: unet or windows.source: image"
            )
        crop = movie.get("crop")
        if crop is not None and not (0 <= crop[0] < crop[1] and 0 <= crop[2] < crop[3]):
            raise InputError(
                f"{where}.crop: {list(crop)} is empty or negative; expected [y0, y1, x0, x1] "
                "with 0 <= y0 < y1 and 0 <= x0 < x1"
            )
        labels = movie.get("labels")
        if labels is not None:
            path = Path(labels)
            if not path.exists():
                raise InputError(f"{where}.labels: {labels} not found; expected a CSV/Parquet labels file or a "
                                 "folder of labelled window images (one subfolder per class)")
            if path.is_file() and path.suffix.lower() not in (".csv", ".tsv", ".txt", ".parquet", ".pq"):
                raise InputError(f"{where}.labels: {labels} is a {path.suffix or 'suffix-less'} file; expected a "
                                 ".csv/.tsv/.parquet labels table or a folder of labelled window images")
            model = stage_settings(config, "rvae", name, source=source)["model"]
            if model in ("jrvae", "vae", "gmm", "rvae3d"):
                raise InputError(f"{where}.labels: rvae.model {model} does not learn from labels; expected "
                                 "rvae.model ssrvae or ssvae (or leave rvae.model unset: it is then ssrvae)")
        shape = _movie_shape(config, name, where)
        shapes[name] = shape
        size = windows.get("size")
        if size == "auto" and "simulate" in movie:
            from .inspect import FALLBACKS

            size = FALLBACKS["windows"]["size"]  # a user movie's auto size is decided by its inspection
        if shape is not None and isinstance(size, int) and size > min(shape[1], shape[2]):
            raise InputError(
                f"{where}.windows.size: {size} px windows do not fit in the {shape[1]} x {shape[2]} px "
                f"frames; expected at most {min(shape[1], shape[2])}"
            )
    if device:
        check_device(config["device"], source)
    return shapes


#: Values of ``rvae.model`` that have a class latent (rvae_tools.rvae.semisupervised).
CLASS_MODELS = ("ssrvae", "ssvae", "jrvae")


def class_movies(config: dict[str, Any]) -> list[str]:
    """The movies whose model (the pooled one, or their own) has classes: they get classes and class figures."""
    if stage_settings(config, "rvae")["pooled"]:
        return list(config["movies"]) if labelled_model(config, None) in CLASS_MODELS else []
    return [name for name in config["movies"] if labelled_model(config, name) in CLASS_MODELS]


def labelled_model(config: dict[str, Any], movie: str | None) -> str:
    """The rvae.model that trains on this movie (None: every movie, pooled): ssrvae when a movie has labels
    and rvae.model is left at its default (rvae), else rvae.model."""
    names = list(config["movies"]) if movie is None else [movie]
    model = stage_settings(config, "rvae", movie)["model"]
    labelled = any(config["movies"][n].get("labels") for n in names)
    return "ssrvae" if labelled and model == section_schema("rvae")["properties"]["model"]["default"] else model


def _movie_shape(config: dict[str, Any], name: str, where: str) -> tuple[int, int, int] | None:
    movie = config["movies"][name]
    if "simulate" in movie:
        sim = stage_settings(config, "simulate", name)
        height, width = sim["height"], sim["width"]
        crop = movie.get("crop")
        if crop is not None:
            if crop[1] > height or crop[3] > width:
                raise InputError(
                    f"{where}.crop: {list(crop)} is outside the simulated {height} x {width} px frame; "
                    "expected y1 <= height and x1 <= width"
                )
            height, width = crop[1] - crop[0], crop[3] - crop[2]
        return sim["frames"], height, width
    from .ingest import read_movie_info  # the readers pull in imaging libraries: only here

    path = Path(movie["path"])
    if not path.exists():
        raise InputError(f"{where}.path: {str(path)!r} not found (relative paths start at {os.getcwd()})")
    options = {k: v for k, v in movie.items() if k in MOVIE_READER_KEYS and k not in ("path", "simulate")}
    try:
        info = read_movie_info(path, **options)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return tuple(int(v) for v in info["shape"])


#: Keys of a stage's section that only say how the workflow splits the stage into jobs (the
#: numbers do not depend on them): the stage's command never sees them, so they are neither
#: in its provenance (``config_hash``) nor a reason for Snakemake to rerun it.
WORKFLOW_ONLY_KEYS: dict[str, tuple[str, ...]] = {"segment": ("frame_chunk",)}


def without_workflow_keys(section: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` of ``section`` without its :data:`WORKFLOW_ONLY_KEYS`."""
    drop = WORKFLOW_ONLY_KEYS.get(section, ())
    return {k: v for k, v in settings.items() if k not in drop}


def movie_frames(config: dict[str, Any], name: str, source: str = "config") -> int:
    """Frames of a movie as ingest will store them (the simulator's ``frames``, or the file's
    header with the movie's reader options such as its frame range; no pixels are read)."""
    return int(_movie_shape(config, name, f"{source}: movies.{name}")[0])


def check_device(device: str, source: str = "config") -> None:
    """Raise :class:`InputError` when ``device`` (cuda, cuda:N, mps) does not exist here."""
    if device in ("auto", "cpu"):
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"{source}: device: {device!r} was requested but no CUDA device is available; expected auto or cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(
                f"{source}: device: {device!r} does not exist; this machine has {torch.cuda.device_count()} "
                f"CUDA device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    elif device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"{source}: device: 'mps' was requested but Apple MPS is not available; expected auto or cpu")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a YAML file sets the same key twice (PyYAML silently keeps the last)."""

    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"line {line}: duplicate key {key!r} (first set on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of letting the last one win."""


def _construct_strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *anchor" merges; keys set after it legitimately override
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # unhashable key: SafeLoader itself reports it below
        if first is not None:
            raise DuplicateKeyError(key, key_node.start_mark.line + 1, first)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text strictly: syntax errors and duplicate keys raise :class:`InputError`
    naming ``source``, the line and (for syntax errors) the column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except DuplicateKeyError as exc:
        raise InputError(f"{source}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = exc.problem or exc.context or "syntax error"
        raise InputError(f"{source}: {where}not valid YAML ({what})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file strictly, without validating it.

    Raises
    ------
    InputError
        When the file is missing, empty (an empty file would silently be the demo), not valid
        YAML (with line and column), sets a key twice, or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the config file ({exc})") from None
    config = parse_yaml(text, str(path))
    if config is None:
        raise InputError(
            f"{path}: the config file is empty; expected a mapping of keys such as 'movies:' "
            "(see config/README.md)"
        )
    if not isinstance(config, dict):
        raise InputError(f"{path}: the config must be a mapping of keys to values, got {type(config).__name__}")
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file strictly (:func:`read_config_file`) and validate it (defaults
    filled in). The checks against the movies and the machine are :func:`check_config`."""
    return validate_config(read_config_file(path), source=str(path))


def section_schema(section: str) -> dict[str, Any]:
    """The schema of one config section, with the shared definitions attached."""
    schema = load_schema()
    try:
        sub = copy.deepcopy(schema["properties"][section])
    except KeyError:
        raise KeyError(f"no config section {section!r} in the schema") from None
    if "$defs" in schema:
        sub["$defs"] = schema["$defs"]
    return sub


def validate_section(
    section: str, settings: dict[str, Any] | None, source: str = "settings", prefix: str | None = None
) -> dict[str, Any]:
    """Validate one section's settings (a copy), filling in defaults.

    ``prefix`` is the key path reported in errors (default: the section name).
    """
    prefix = section if prefix is None else prefix
    settings = copy.deepcopy(settings) if settings is not None else {}
    if not isinstance(settings, dict):
        raise InputError(f"{source}: {prefix}: expected a mapping, got {type(settings).__name__}")
    _validate(settings, section_schema(section), source, prefix)
    return settings


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` merged in, nested mappings merged key by key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_settings(
    config: dict[str, Any], section: str, movie: str | None = None, source: str = "config"
) -> dict[str, Any]:
    """Settings of one stage for one movie: the section merged with the movie's overrides.

    ``seed`` is set from the top-level ``seed`` unless the section has its own.
    """
    base = config.get(section, {}) or {}
    if movie is not None:
        movies = config.get("movies", {})
        if movie not in movies:
            raise InputError(f"{source}: no movie named {movie!r} under 'movies' (have: {', '.join(movies) or 'none'})")
        override = movies[movie].get(section) or {}
        base = deep_merge(base, override)
    prefix = section if movie is None else f"movies.{movie}.{section}"
    settings = validate_section(section, base, source=source, prefix=prefix)
    if settings.get("seed") is None:
        settings["seed"] = int(config.get("seed", 0))
    return settings


def movie_entry(config: dict[str, Any], movie: str, source: str = "config") -> dict[str, Any]:
    """The reader options of one movie (path or simulate, channel, crop, ...)."""
    movies = config.get("movies", {})
    if movie not in movies:
        raise InputError(f"{source}: no movie named {movie!r} under 'movies' (have: {', '.join(movies) or 'none'})")
    return {k: v for k, v in movies[movie].items() if k in MOVIE_READER_KEYS}


# --------------------------------------------------------------------------- CLI helpers


def add_settings_arguments(parser: argparse.ArgumentParser, section: str) -> None:
    """Add ``--config``, ``--movie`` and ``--settings`` to a stage's parser."""
    group = parser.add_argument_group(f"settings (the config's '{section}' section)")
    group.add_argument("--config", metavar="FILE", help=f"config file (YAML); its '{section}' section is used")
    group.add_argument("--movie", metavar="NAME", help="apply this movie's overrides from the config")
    group.add_argument(
        "--settings", metavar="JSON",
        help=f"the '{section}' section as JSON (as Snakemake rules pass it); overrides --config",
    )
    group.add_argument("--seed", type=int, default=None, help="random seed (overrides the config)")
    group.add_argument(
        "--inspect", metavar="JSON",
        help="inspect.json of the movie (rvae-tools inspect): settings left at 'auto' take its values",
    )


def settings_from_args(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The validated settings of ``section`` chosen by the CLI arguments of :func:`add_settings_arguments`."""
    if getattr(args, "settings", None):
        try:
            raw = json.loads(args.settings)
        except json.JSONDecodeError as exc:
            raise InputError(f"--settings: not valid JSON ({exc})") from None
        settings = validate_section(section, raw, source="--settings")
        settings.setdefault("seed", 0)
        if settings["seed"] is None:
            settings["seed"] = 0
    elif getattr(args, "config", None):
        config = load_config(args.config)
        settings = stage_settings(config, section, getattr(args, "movie", None), source=args.config)
    else:
        settings = validate_section(section, {}, source="defaults")
        if settings.get("seed") is None:
            settings["seed"] = 0
    if getattr(args, "seed", None) is not None:
        settings["seed"] = int(args.seed)
    # Settings left at 'auto' take the inspected value (or their fallback): no stage sees 'auto'.
    from .inspect import read_inspection, resolve_settings

    inspection = read_inspection(args.inspect) if getattr(args, "inspect", None) else None
    settings, _ = resolve_settings(section, settings, inspection)
    return without_workflow_keys(section, settings)
