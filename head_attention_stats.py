"""Experiment 3, step 1: per-head attention scores on corner counterfactual pairs. See --help."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.experiments.corner_stats")
