# Segmentation: a U-Net per movie (or a shared checkpoint), or trackpy.locate.
#
# Which rule makes a movie's detections is decided by its `segment` settings: movies with
# method unet go through `segment` (detections + probability map), movies with method
# locate through `segment_locate`. A unet movie without `segment.checkpoint` gets its own
# network from `train_segmenter` (trained on the movie's own simulator settings, or on the
# `segment.synthetic` settings for a real movie); with a checkpoint the training is skipped.
import shlex


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


rule train_segmenter:
    """Train the U-Net segmenter of one movie on simulated frames, annotations or pseudo-labels."""
    input:
        unpack(segmenter_training_input),
    output:
        model=f"{RESULTS}/models/segmenter/{{movie}}.pt",
        history=f"{RESULTS}/models/segmenter/{{movie}}.history.csv",
    wildcard_constraints:
        movie=_movie_pattern(SEGMENT_TRAIN),
    params:
        settings=settings("segment"),
        extra=segmenter_training_args,
        device=config["device"],
    log:
        f"{RESULTS}/logs/train_segmenter/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_segmenter/{{movie}}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
        cpus_per_gpu=2,
    conda:
        "../envs/train_segmenter.yaml"
    shell:
        "rvae-tools train-segmenter -o {output.model:q} --history {output.history:q} {params.extra} "
        "--device {params.device} --threads {threads} --settings {params.settings:q} > {log} 2>&1"


rule segment:
    """Detect particles with the U-Net: detections.parquet and the per-pixel probability map."""
    input:
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
        checkpoint=segmenter_checkpoint,
    output:
        detections=f"{RESULTS}/{{movie}}/detections.parquet",
        probability=directory(f"{RESULTS}/{{movie}}/probability.zarr"),
    wildcard_constraints:
        movie=_movie_pattern(SEGMENT_UNET),
    params:
        settings=settings("segment"),
        device=config["device"],
    log:
        f"{RESULTS}/logs/segment/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment/{{movie}}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools segment {input.movie:q} -o {output.detections:q} --checkpoint {input.checkpoint:q} "
        "--probability {output.probability:q} --device {params.device} --threads {threads} "
        "--settings {params.settings:q} > {log} 2>&1"


rule segment_locate:
    """Detect particles with trackpy.locate (the classical baseline): detections.parquet."""
    input:
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
    output:
        detections=f"{RESULTS}/{{movie}}/detections.parquet",
    wildcard_constraints:
        movie=_movie_pattern(SEGMENT_LOCATE),
    params:
        settings=settings("segment"),
    log:
        f"{RESULTS}/logs/segment/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools segment {input.movie:q} -o {output.detections:q} --settings {params.settings:q} > {log} 2>&1"
