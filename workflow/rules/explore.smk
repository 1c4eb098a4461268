# The interactive latent explorer of one movie (a self-contained HTML page, in the report).


rule explorer:
    """Scatter of the latents with hover windows and decodings, frame slider, trajectory links."""
    input:
        latents=f"{RESULTS}/{{movie}}/latents.zarr",
        patches=f"{RESULTS}/{{movie}}/patches.zarr",
        dynamics=f"{RESULTS}/{{movie}}/dynamics.zarr",
        model=rvae_model_path,
    output:
        report(
            f"{RESULTS}/{{movie}}/explorer.html",
            caption="../report/explorer.rst",
            category="{movie}",
            subcategory="explorer",
        ),
    params:
        movie_dir=lambda wildcards: f"{RESULTS}/{wildcards.movie}",
        settings=settings("explorer"),
    log:
        f"{RESULTS}/logs/explorer/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/explorer/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/figures.yaml"
    shell:
        "OMP_NUM_THREADS={threads} rvae-tools explorer {params.movie_dir:q} --model {input.model:q}"
        " -o {output:q} --settings {params.settings:q} > {log:q} 2>&1"
