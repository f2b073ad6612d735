"""Experiment 1 for any family (--model): cross- and self-attention on ShapeWorld scenes. See --help and README."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.experiments.vlm_analysis")
