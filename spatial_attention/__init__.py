"""Shared code of the spatial-attention study, in layers. A module imports only from its own layer and the layers
below it (``tests/test_layers.py`` holds the package to that), bottom first:

- ``stats/``, ``engine/``: numbers (intervals, tests, the metrics of maps) and the attention-capture engine; they
  import nothing of ours.
- ``common/``: what every command shares: the one-line errors, output files and records, the command-line frame.
- ``data/`` and the adapters in ``models/`` (beside this package): the data sets (read, checked, generated) and one
  adapter per model family.
- ``run/``: what an experiment runs on: the model and data options, the resumable run loop, the random-weights
  control, the figures.
- ``experiments/``: one module per experiment step (and the toy models' training, the engine's self-check).
- ``study/``: the whole study in one command, and its report.

The top-level scripts (``vlm_atten_analysis_*.py`` and friends) are thin entry points over this package.
"""
import os

# On the CPU, MKL's matrix products round differently from one process to the next with their buffers' alignment:
# here about one run in eight of the same command differed in its first batch's scores (by 2e-7, enough to move a
# control's p-value in the third decimal). Strict conditional numerical reproducibility makes a run repeat its bytes,
# for about 5% of a tiny model's forward time (GPUs do not use MKL). Every command imports this package before torch
# loads MKL; a value set in the environment is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
