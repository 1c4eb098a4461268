# rvae-tools workflow: microscopy movie -> detections -> trajectories -> windows -> rVAE latents
# -> ensemble dynamics and figures. Each rule wires files to one `rvae-tools` CLI call.
import os
import sys

from snakemake.utils import min_version

from rvae_tools.config import read_config_file
from rvae_tools.errors import InputError

min_version("9.0")

# Read the default config strictly first: Snakemake's own reader reports neither the line of
# a YAML error nor a duplicate key (the last one would silently win).
if os.path.exists("config/config.yaml"):
    try:
        read_config_file("config/config.yaml")
    except InputError as _error:
        sys.exit(f"rvae-tools: invalid configuration: {_error}")


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
include: "workflow/rules/classes.smk"
include: "workflow/rules/dynamics.smk"
include: "workflow/rules/explore.smk"


# Every contract file of every movie and model (see final_outputs in common.smk).
rule all:
    input:
        final_outputs(),
    default_target: True
