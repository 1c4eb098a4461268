rule simulate:
    """Simulate the demo movie of protein nanorods assembling on mica, with its ground truth."""
    output:
        movie=f"{RESULTS}/{{movie}}/raw/movie.tif",
        truth=f"{RESULTS}/{{movie}}/truth.parquet",
        metadata=f"{RESULTS}/{{movie}}/raw/simulation.json",
    params:
        settings=settings("simulate"),
        outdir=lambda wildcards: f"{RESULTS}/{wildcards.movie}",
    log:
        f"{RESULTS}/logs/simulate/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/simulate/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/simulate.yaml"
    shell:
        "rvae-tools simulate --outdir {params.outdir:q} --settings {params.settings:q} > {log:q} 2>&1"
