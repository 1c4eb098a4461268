# The classes of a model with a class latent (rvae.model ssrvae, ssvae, jrvae; a movie with
# labels trains ssrvae): per-window classes and the class figures of each movie it encodes.
CLASS_FIGURES = ("class_templates", "class_manifold", "class_fractions")
CLASS_MOVIES = class_movies(config)


rule classify:
    """Class probabilities of every window (classes.parquet) and the class figures: upright templates,
    the latent manifold of each class, class fractions per frame."""
    input:
        patches=f"{RESULTS}/{{movie}}/patches.zarr",
        latents=f"{RESULTS}/{{movie}}/latents.zarr",
        model=rvae_model_path,
    output:
        classes=f"{RESULTS}/{{movie}}/classes.parquet",
        figures=[
            report(
                f"{RESULTS}/{{movie}}/figures/{stem}.png",
                caption=f"../report/{stem}.rst",
                category="{movie}",
                subcategory="classes",
            )
            for stem in CLASS_FIGURES
        ],
    wildcard_constraints:
        movie=_movie_pattern(CLASS_MOVIES),
    params:
        figures=lambda wildcards: f"{RESULTS}/{wildcards.movie}/figures",
        device=config["device"],
    log:
        f"{RESULTS}/logs/classify/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/classify/{{movie}}.tsv"
    threads: 2
    resources:
        mem_mb=mem_mb_from_input(2000, 4),
        runtime=runtime_from_input(10, 1),
    conda:
        "../envs/encode.yaml"
    shell:
        "OMP_NUM_THREADS={threads} rvae-tools classify {input.patches:q} {input.model:q} -o {output.classes:q}"
        " --latents {input.latents:q} --figures {params.figures:q} --device {params.device:q} --no-progress"
        " > {log:q} 2>&1"
