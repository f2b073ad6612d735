"""Generate the study's data offline: ShapeWorld-format worlds or the corner pairs. See --help and data/README.md."""
from spatial_attention.data.generate import main

if __name__ == "__main__":
    main()
