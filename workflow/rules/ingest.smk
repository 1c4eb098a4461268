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
        runtime=30,
    conda:
        "../envs/ingest.yaml"
    shell:
        "rvae-tools ingest {input:q} -o {output:q} --options {params.options:q} > {log} 2>&1"
