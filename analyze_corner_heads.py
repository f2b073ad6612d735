"""Experiment 3, step 2: shared and unique heads across the four corners. See --help."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.experiments.corner_analysis")
