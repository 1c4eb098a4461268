rule encode:
    """Encode every window with the trained rVAE into per-trajectory latents on (particle, frame)."""
    input:
        patches=f"{RESULTS}/{{movie}}/patches.zarr",
        model=rvae_model_path,
    output:
        directory(f"{RESULTS}/{{movie}}/latents.zarr"),
    params:
        settings=settings("rvae"),
        device=config["device"],
    log:
        f"{RESULTS}/logs/encode/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/encode/{{movie}}.tsv"
    threads: 2
    resources:
        mem_mb=mem_mb_from_input(2000, 4),
        runtime=runtime_from_input(10, 1),
    conda:
        "../envs/encode.yaml"
    shell:
        "OMP_NUM_THREADS={threads} rvae-tools encode {input.patches:q} {input.model:q} -o {output:q}"
        " --device {params.device:q} --settings {params.settings:q} > {log:q} 2>&1"
