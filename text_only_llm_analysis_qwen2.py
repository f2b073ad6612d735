"""Experiment 2 (qwen2): text-only relation-to-entity attention with entity-swap counterfactuals. See --help."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.experiments.text_analysis", "qwen2")
