# The classes of a model with a class latent (rvae.model ssrvae, ssvae, jrvae; a movie with
# labels trains ssrvae): per-window classes and the class figures of each movie it encodes.
# A movie with a reference class per window (a labels table, or a simulated movie's truth)
# also gets the confusion matrix (rule classify_with_reference).
CLASS_FIGURES = ("class_templates", "class_manifold", "class_fractions")
CLASS_MOVIES = class_movies(config)


#: Class movies with a reference class per window: a labels table, else the simulator's truth.
REFERENCE_MOVIES = [m for m in CLASS_MOVIES if _labels_table(m) or m in SIMULATED]


rule classify:
    """Class probabilities of every window (classes.parquet, with each window's pose and spreads from
    the latents) and the class figures: upright templates, the latent manifold of each class, class
    fractions per frame."""
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
        movie=_movie_pattern([m for m in CLASS_MOVIES if m not in REFERENCE_MOVIES]),
    params:
        figures=lambda wildcards: f"{RESULTS}/{wildcards.movie}/figures",
        device=config["device"],
        reference="",
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
        " {params.reference} > {log:q} 2>&1"


use rule classify as classify_with_reference with:
    input:
        patches=f"{RESULTS}/{{movie}}/patches.zarr",
        latents=f"{RESULTS}/{{movie}}/latents.zarr",
        model=rvae_model_path,
        reference=class_reference,
    output:
        classes=f"{RESULTS}/{{movie}}/classes.parquet",
        figures=[
            report(
                f"{RESULTS}/{{movie}}/figures/{stem}.png",
                caption=f"../report/{stem}.rst",
                category="{movie}",
                subcategory="classes",
            )
            for stem in (*CLASS_FIGURES, "class_confusion")
        ],
    wildcard_constraints:
        movie=_movie_pattern(REFERENCE_MOVIES),
    params:
        figures=lambda wildcards: f"{RESULTS}/{wildcards.movie}/figures",
        device=config["device"],
        reference=class_reference_arg,
