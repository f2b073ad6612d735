"""Self-check: the capture engine against plain eager attention on your model. See --help."""
import sys

from spatial_attention.experiments.verify import main

if __name__ == "__main__":
    sys.exit(main())
