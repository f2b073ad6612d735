"""Experiment 1 (llava): cross- and self-attention on ShapeWorld scenes. See --help and README."""
from spatial_attention.experiments.vlm_analysis import main

if __name__ == "__main__":
    main("llava")
