"""Shared code of the spatial-attention study: data readers and generators,
metrics, the attention-capture engine and the experiment drivers.

The top-level scripts (``vlm_atten_analysis_*.py`` and friends) are thin entry
points over this package; everything model-specific lives in ``models/``.
"""
