"""Experiment 2 (qwen2): text-only relation-to-entity attention with entity-swap counterfactuals. See --help."""
from spatial_attention.experiments.text_analysis import main

if __name__ == "__main__":
    main("qwen2")
