rule train:
    """Train the rotationally invariant VAE on the windows (pooled over all movies, or per movie)."""
    input:
        _rvae_train_patches,
    output:
        model=f"{RESULTS}/models/rvae/{{scope}}/model.pt",
        history=f"{RESULTS}/models/rvae/{{scope}}/history.csv",
    wildcard_constraints:
        scope="|".join(["pooled", *MOVIES]),
    params:
        settings=_rvae_train_settings,
        device=config["device"],
    log:
        f"{RESULTS}/logs/train/{{scope}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{scope}}.tsv"
    threads: 2
    resources:
        gpu=1,
        cpus_per_gpu=2,
        mem_mb=rvae_train_mem_mb,
        runtime=runtime_from_input(20, 2),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} rvae-tools train {input:q} -o {output.model:q} --device {params.device:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
