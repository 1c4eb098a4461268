rule windows:
    """Cut a window around every tracked detection, centred sub-pixel and normalised per movie."""
    input:
        unpack(inspect_input),
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
        tracks=f"{RESULTS}/{{movie}}/tracks.parquet",
        # the segmenter's probability map, only when windows are cut from it (windows.source)
        probability=lambda wildcards: (
            f"{RESULTS}/{wildcards.movie}/probability.zarr"
            if stage_settings(config, "windows", wildcards.movie)["source"] == "probability"
            else []
        ),
    output:
        directory(f"{RESULTS}/{{movie}}/patches.zarr"),
    params:
        settings=settings("windows"),
        inspect=inspect_args,
        probability=lambda wildcards, input: (
            f"--probability {shlex.quote(str(input.probability))}" if input.probability else ""
        ),
    log:
        f"{RESULTS}/logs/windows/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/windows/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=runtime_from_input(10, 0.5),
    conda:
        "../envs/windows.yaml"
    shell:
        "rvae-tools windows {input.movie:q} {input.tracks:q} -o {output:q} {params.probability}"
        " --settings {params.settings:q} {params.inspect} > {log:q} 2>&1"
