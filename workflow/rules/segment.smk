# Segmentation: a U-Net per movie (or a shared checkpoint), or trackpy.locate.
#
# Which rule makes a movie's detections is decided by its `segment` settings: movies with
# method unet go through `segment` (detections + probability map), movies with method
# locate through `segment_locate`. A unet movie without `segment.checkpoint` gets its own
# network from `train_segmenter` (trained on the movie's own simulator settings, or on the
# `segment.synthetic` settings for a real movie); with a checkpoint the training is skipped.
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
        "--device {params.device:q} --threads {threads} --settings {params.settings:q} > {log:q} 2>&1"


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
        mem_mb=mem_mb_from_input(2000, 6),
        runtime=runtime_from_input(10, 1),
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools segment {input.movie:q} -o {output.detections:q} --checkpoint {input.checkpoint:q} "
        "--probability {output.probability:q} --device {params.device:q} --threads {threads} "
        "--settings {params.settings:q} > {log:q} 2>&1"


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
        mem_mb=mem_mb_from_input(1500, 2),
        runtime=runtime_from_input(10, 1),
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools segment {input.movie:q} -o {output.detections:q} --settings {params.settings:q} > {log:q} 2>&1"
