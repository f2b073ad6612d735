"""Generate the study's data offline: ShapeWorld-format worlds or the corner pairs. See --help and data/README.md."""
from spatial_attention.common.console import run_script

if __name__ == "__main__":
    run_script("spatial_attention.data.generate")
