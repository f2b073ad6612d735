"""The data sets: ShapeWorld scenes read (``shapeworld``) and checked (``validate``), the corner counterfactual
pairs (``counterfactual``), and both generated offline (``generate``)."""
