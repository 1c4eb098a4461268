# rvae-tools workflow: microscopy movie -> detections -> trajectories -> windows -> rVAE latents
# -> ensemble dynamics and figures. Each rule wires files to one `rvae-tools` CLI call.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    movie="|".join(MOVIES),


include: "workflow/rules/simulate.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/track.smk"
include: "workflow/rules/windows.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/encode.smk"
include: "workflow/rules/dynamics.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
