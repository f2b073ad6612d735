"""Self-check: the capture engine against plain eager attention on your model. See --help."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.experiments.verify")
