"""What every command shares: the user-facing errors (``errors``), output files, results and ``run.json``
(``runio``), and the command-line frame: help layout, count checks, how a script ends (``console``)."""
