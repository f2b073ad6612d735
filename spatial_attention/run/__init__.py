"""What an experiment runs on: the model and data options (``cli``, ``options``), the resumable, refusing run loop
(``runloop``), the random-weights control (``controls``) and the figures (``figures``)."""
