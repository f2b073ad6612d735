"""Experiment 3, step 2: shared and unique heads across the four corners. See --help."""
from spatial_attention.experiments.corner_analysis import main

if __name__ == "__main__":
    main()
