"""Experiment 2 for any family (--model): text-only relation-to-entity attention with entity-swap
counterfactuals. See --help and README."""
from spatial_attention.experiments.text_analysis import main

if __name__ == "__main__":
    main()
