"""Experiment 3, step 3: ablate the shared / unique heads and measure the yes/no answer. See --help."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.experiments.ablation")
