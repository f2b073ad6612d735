"""The attention-capture engine: attention rows read inside the model's own attention function (``capture``), a
batch run once up to a layer and the rest again (``prefix``), and the eager reference it is checked against
(``reference``). Imports nothing of ours; the adapters in ``models/`` build on it."""
