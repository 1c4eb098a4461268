rule ingest:
    """Read the movie into the canonical Zarr store image(frame, y, x) with units and checksum."""
    input:
        movie_source,
    output:
        directory(f"{RESULTS}/{{movie}}/movie.zarr"),
    params:
        options=reader_options,
    log:
        f"{RESULTS}/logs/ingest/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ingest/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=runtime_from_input(10, 0.05),
    conda:
        "../envs/ingest.yaml"
    shell:
        "rvae-tools ingest {input:q} -o {output:q} --options {params.options:q} > {log:q} 2>&1"
