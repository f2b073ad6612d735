"""Experiment 4 for any family (--model): the heads that carry a caption's relation, found on one half of the pairs and tested by ablation on the other. See --help and README."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.experiments.relation_heads")
