rule track:
    """Link detections into trajectories (trackpy), estimate drift, filter stubs, MSD and diffusion."""
    input:
        unpack(inspect_input),
        detections=f"{RESULTS}/{{movie}}/detections.parquet",
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
    output:
        tracks=f"{RESULTS}/{{movie}}/tracks.parquet",
        drift=f"{RESULTS}/{{movie}}/drift.parquet",
        trajectories=f"{RESULTS}/{{movie}}/trajectories.parquet",
        msd=f"{RESULTS}/{{movie}}/msd.parquet",
    params:
        settings=settings("track"),
        inspect=inspect_args,
    log:
        f"{RESULTS}/logs/track/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/track/{{movie}}.tsv"
    threads: 1
    resources:
        # the movie is read only for its units: the detections drive the cost
        mem_mb=mem_mb_from_input(1500, 20, only=["detections"]),
        runtime=runtime_from_input(10, 2, only=["detections"]),
    conda:
        "../envs/track.yaml"
    shell:
        "rvae-tools track {input.detections:q} --movie-zarr {input.movie:q}"
        " --tracks {output.tracks:q} --drift {output.drift:q}"
        " --trajectories {output.trajectories:q} --msd {output.msd:q}"
        " --settings {params.settings:q} {params.inspect} > {log:q} 2>&1"
