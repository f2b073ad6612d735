"""Numbers only: intervals, permutation tests and FDR (``inference``), and the metrics of an attention map against
a mask (``metrics``). Imports nothing of ours."""
