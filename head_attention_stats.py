"""Experiment 3, step 1: per-head attention scores on corner counterfactual pairs. See --help."""
from spatial_attention.experiments.corner_stats import main

if __name__ == "__main__":
    main()
