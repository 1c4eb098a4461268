"""Figures. One module per stage; each exports

``FIGURES: dict[str, str]``
    figure stem -> caption (the stems are the file names under ``results/{movie}/figures/``
    and the captions go into the Snakemake report), and

``draw(movie_dir, figures_dir, *, formats=("png", "svg"), dpi=150) -> list[Path]``
    reads that stage's outputs from ``movie_dir`` (``results/{movie}``), writes every figure
    in ``FIGURES`` and returns the written paths.
"""
