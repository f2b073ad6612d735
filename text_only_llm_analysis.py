"""Experiment 2 for any family (--model): text-only relation-to-entity attention with entity-swap
counterfactuals. See --help and README."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.experiments.text_analysis")
