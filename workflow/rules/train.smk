rule train_checkpoints:
    """The rVAE trainer's per-epoch checkpoint folder, its own output so that Snakemake removes it
    with --delete-all-output / --forcerun train_checkpoints, but keeps it when a killed train job
    is rerun (Snakemake deletes a job's own outputs before running it, which would lose the
    resume). The trainer only continues checkpoints whose fingerprint matches the windows and
    settings; others it removes, saying what changed."""
    output:
        directory(f"{RESULTS}/models/rvae/{{scope}}/model.checkpoints"),
    wildcard_constraints:
        scope="|".join(["pooled", *MOVIES]),
    log:
        f"{RESULTS}/logs/train_checkpoints/{{scope}}.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/train.yaml"
    shell:
        "rvae-tools checkpoint-folder {output:q} > {log:q} 2>&1"


rule train:
    """Train the rotationally invariant VAE on the windows (pooled over all movies, or per movie); movies
    with labels (a labels file or a folder of labelled window images) teach it their classes."""
    input:
        patches=_rvae_train_patches,
        checkpoints=f"{RESULTS}/models/rvae/{{scope}}/model.checkpoints",
        labels=rvae_train_labels,
    output:
        model=f"{RESULTS}/models/rvae/{{scope}}/model.pt",
        history=f"{RESULTS}/models/rvae/{{scope}}/history.csv",
    wildcard_constraints:
        scope="|".join(["pooled", *MOVIES]),
    params:
        settings=_rvae_train_settings,
        labels=rvae_train_label_args,
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
        runtime=lambda wildcards, input: int(20 + 2 * input_mb(input.patches)),
    conda:
        "../envs/train.yaml"
    shell:
        "OMP_NUM_THREADS={threads} rvae-tools train {input.patches:q} -o {output.model:q}"
        " --checkpoints {input.checkpoints:q} --device {params.device:q} {params.labels}"
        " --settings {params.settings:q} > {log:q} 2>&1"
