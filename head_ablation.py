"""Experiment 3, step 3: ablate the shared / unique heads and measure the yes/no answer. See --help."""
from spatial_attention.experiments.ablation import main

if __name__ == "__main__":
    main()
