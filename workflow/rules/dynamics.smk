# Ensemble dynamics of one movie and every figure of the movie (registered in the report).
import os

from rvae_tools.figures import figure_stems

# stage -> {stem: caption} of the figure modules installed; each PNG is a declared output so
# that `snakemake --report` can collect it with its caption.
FIGURES = figure_stems()


rule dynamics:
    """Ensemble statistics, order parameters, rotational dynamics and the ordering transition."""
    input:
        latents=f"{RESULTS}/{{movie}}/latents.zarr",
        tracks=f"{RESULTS}/{{movie}}/tracks.parquet",
    output:
        directory(f"{RESULTS}/{{movie}}/dynamics.zarr"),
    params:
        settings=settings("dynamics"),
    log:
        f"{RESULTS}/logs/dynamics/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/dynamics/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/dynamics.yaml"
    shell:
        "rvae-tools dynamics {input.latents:q} --tracks {input.tracks:q} -o {output:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule figures:
    """Every figure of one movie (PNG + vector), drawn from the outputs of each stage."""
    input:
        dynamics=f"{RESULTS}/{{movie}}/dynamics.zarr",
        latents=f"{RESULTS}/{{movie}}/latents.zarr",
        tracks=f"{RESULTS}/{{movie}}/tracks.parquet",
        detections=f"{RESULTS}/{{movie}}/detections.parquet",
        patches=f"{RESULTS}/{{movie}}/patches.zarr",
        movie=f"{RESULTS}/{{movie}}/movie.zarr",
        model=rvae_model_path,
    output:
        [
            report(
                f"{RESULTS}/{{movie}}/figures/{stem}.png",
                caption=(
                    f"../report/{stem}.rst"
                    if os.path.exists(os.path.join(workflow.basedir, "workflow", "report", f"{stem}.rst"))
                    else "../report/figure.rst"
                ),
                category="{movie}",
                subcategory=stage,
            )
            for stage, stems in FIGURES.items()
            for stem in stems
        ],
    params:
        settings=settings("figures"),
        movie_dir=lambda wildcards: f"{RESULTS}/{wildcards.movie}",
    log:
        f"{RESULTS}/logs/figures/{{movie}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/figures/{{movie}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/figures.yaml"
    shell:
        "rvae-tools figures {params.movie_dir:q} --model {input.model:q} --settings {params.settings:q} > {log:q} 2>&1"
