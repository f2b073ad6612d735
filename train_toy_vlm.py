"""Train a toy VLM of one family's real architecture as a positive control, or evaluate the committed one. See --help."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.experiments.train_toy")
