# Inspection and segmentation.
#
# A user (non-simulated) movie is inspected first (rule `inspect`: polarity, particle size,
# density, SNR, drift -> inspect.json and a QC figure); every stage setting left at `auto`
# then takes the inspected value (`--inspect`), and bad input (no particles, particles under
# 3 px or over a third of the frame) stops the workflow there, before any training.
#
# Which rule makes a movie's detections is decided by its `segment.method` (auto = unet for a
# simulated movie, classical for a user movie): unet through `segment` (detections +
# probability map; with segment.frame_chunk, `segment_chunk` jobs joined by `segment_gather`),
# classical through `segment_classical`, locate through `segment_locate` (with
# segment.frame_chunk: `segment_chunk_detector` jobs joined by `segment_gather_detector`).
# A unet movie without `segment.checkpoint` gets its own network from `train_segmenter`
# (trained on the movie's own simulator settings, or, for a user movie, self-trained on the
# classical detector's regions in the movie itself); with a checkpoint the training is skipped.
rule inspect:
    """Measure a user movie's particles and decide the settings left at auto."""
    input:
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
    output:
        inspection=f"{RESULTS}/{{movie}}/inspect.json",
        figure=report(
            f"{RESULTS}/{{movie}}/figures/inspect.png",
            caption="../report/inspect.rst",
            category="{movie}",
            subcategory="inspection",
        ),
    wildcard_constraints:
        movie=_movie_pattern(USER_MOVIES),
    params:
        settings=inspect_settings,
    log:
        f"{RESULTS}/logs/inspect/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/inspect/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools inspect {input.movie:q} -o {output.inspection:q} --figure {output.figure:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule train_segmenter:
    """Train the U-Net segmenter of one movie on simulated frames, annotations or pseudo-labels (self-training)."""
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
        unpack(inspect_input),
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
        checkpoint=segmenter_checkpoint,
    output:
        detections=f"{RESULTS}/{{movie}}/detections.parquet",
        probability=directory(f"{RESULTS}/{{movie}}/probability.zarr"),
    wildcard_constraints:
        movie=_movie_pattern(SEGMENT_WHOLE),
    params:
        settings=settings("segment"),
        inspect=inspect_args,
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
        "--settings {params.settings:q} {params.inspect} > {log:q} 2>&1"


# A movie with segment.frame_chunk: N is segmented N frames per job (`segment_chunk`, one job
# per chunk; a cluster runs them side by side), and `segment_gather` joins the chunks into the
# same detections.parquet and probability.zarr that `segment` writes, bit-identical: every
# step is per frame (normalisation, network, threshold, blobs), and the inspection of a user
# movie is the earlier `inspect` job. The chunks get `segment`'s threads: torch's CPU
# convolutions round differently with another thread count.
rule segment_chunk:
    """Detect particles with the U-Net in one chunk of frames: its rows of detections.parquet and frames of probability.zarr."""
    input:
        unpack(inspect_input),
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
        checkpoint=segmenter_checkpoint,
    output:
        detections=temp(f"{RESULTS}/{{movie}}/segment_chunks/{{chunk}}.detections.parquet"),
        probability=temp(directory(f"{RESULTS}/{{movie}}/segment_chunks/{{chunk}}.probability.zarr")),
    wildcard_constraints:
        movie=_movie_pattern(SEGMENT_CHUNKED),
        chunk=r"\d+",
    params:
        settings=settings("segment"),
        inspect=inspect_args,
        device=config["device"],
        frames=segment_chunk_frames,
    log:
        f"{RESULTS}/logs/segment_chunk/{{movie}}/{{chunk}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment_chunk/{{movie}}/{{chunk}}.tsv"
    threads: 2
    resources:
        mem_mb=mem_mb_from_input(2000, 6),
        runtime=chunk_runtime(10, 1),
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools segment {input.movie:q} -o {output.detections:q} --checkpoint {input.checkpoint:q} "
        "--probability {output.probability:q} --frames {params.frames} --device {params.device:q} "
        "--threads {threads} --settings {params.settings:q} {params.inspect} > {log:q} 2>&1"


rule segment_gather:
    """Join a movie's frame chunks into detections.parquet and probability.zarr, as one segment job writes them."""
    input:
        unpack(segment_chunk_parts),
    output:
        detections=f"{RESULTS}/{{movie}}/detections.parquet",
        probability=directory(f"{RESULTS}/{{movie}}/probability.zarr"),
    wildcard_constraints:
        movie=_movie_pattern(SEGMENT_CHUNKED),
    log:
        f"{RESULTS}/logs/segment_gather/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment_gather/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=runtime_from_input(10, 0.05),
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools segment-gather -o {output.detections:q} --parts {input.detections:q} "
        "--probability {output.probability:q} --probability-parts {input.probability:q} > {log:q} 2>&1"


rule segment_locate:
    """Detect particles with trackpy.locate (round blobs): detections.parquet."""
    input:
        unpack(inspect_input),
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
    output:
        detections=f"{RESULTS}/{{movie}}/detections.parquet",
    wildcard_constraints:
        movie=_movie_pattern(SEGMENT_LOCATE_WHOLE),
    params:
        settings=settings("segment"),
        inspect=inspect_args,
    log:
        f"{RESULTS}/logs/segment/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=mem_mb_from_input(1500, 2, only=["movie"]),
        runtime=runtime_from_input(10, 1, only=["movie"]),
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools segment {input.movie:q} -o {output.detections:q} --settings {params.settings:q}"
        " {params.inspect} > {log:q} 2>&1"


rule segment_classical:
    """Detect particles of any shape with the classical detector (threshold, watershed, moments)."""
    input:
        unpack(inspect_input),
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
    output:
        detections=f"{RESULTS}/{{movie}}/detections.parquet",
    wildcard_constraints:
        movie=_movie_pattern(SEGMENT_CLASSICAL_WHOLE),
    params:
        settings=settings("segment"),
        inspect=inspect_args,
    log:
        f"{RESULTS}/logs/segment/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=mem_mb_from_input(1500, 3, only=["movie"]),
        runtime=runtime_from_input(10, 1, only=["movie"]),
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools segment {input.movie:q} -o {output.detections:q} --settings {params.settings:q}"
        " {params.inspect} > {log:q} 2>&1"


# segment.frame_chunk for the detectors without a network (classical, locate): the same split,
# without checkpoint or probability map. Their settings left at `auto` come from the movie's
# inspect.json (one earlier job over the whole movie), so every chunk detects as one job does.
rule segment_chunk_detector:
    """Detect particles with the classical detector or trackpy.locate in one chunk of frames: its rows of detections.parquet."""
    input:
        unpack(inspect_input),
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
    output:
        detections=temp(f"{RESULTS}/{{movie}}/segment_chunks/{{chunk}}.detections.parquet"),
    wildcard_constraints:
        movie=_movie_pattern(SEGMENT_CHUNKED_DETECTOR),
        chunk=r"\d+",
    params:
        settings=settings("segment"),
        inspect=inspect_args,
        frames=segment_chunk_frames,
    log:
        f"{RESULTS}/logs/segment_chunk/{{movie}}/{{chunk}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment_chunk/{{movie}}/{{chunk}}.tsv"
    threads: 1
    resources:
        mem_mb=mem_mb_from_input(1500, 3, only=["movie"]),
        runtime=chunk_runtime(10, 1, only=["movie"]),
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools segment {input.movie:q} -o {output.detections:q} --frames {params.frames} "
        "--settings {params.settings:q} {params.inspect} > {log:q} 2>&1"


rule segment_gather_detector:
    """Join a movie's frame chunks into detections.parquet, as one segment_classical or segment_locate job writes it."""
    input:
        detections=segment_chunk_detections,
    output:
        detections=f"{RESULTS}/{{movie}}/detections.parquet",
    wildcard_constraints:
        movie=_movie_pattern(SEGMENT_CHUNKED_DETECTOR),
    log:
        f"{RESULTS}/logs/segment_gather/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment_gather/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=runtime_from_input(10, 0.05),
    conda:
        "../envs/segment.yaml"
    shell:
        "rvae-tools segment-gather -o {output.detections:q} --parts {input.detections:q} > {log:q} 2>&1"
