"""One module per experiment step, each behind a thin top-level script:

- experiment 1, localisation (``vlm_analysis``, summarised by ``summary``);
- experiment 2, text-only relation-to-entity attention (``text_analysis``);
- experiment 3, corner heads: scores (``corner_stats``, ``patching``), their statistics (``heads``,
  ``corner_results``, ``corner_analysis``) and the ablation (``ablation``, ``ablation_heads``, ``ablation_measure``);
- the toy models' training (``toy``) and the engine's self-check (``verify``)."""
