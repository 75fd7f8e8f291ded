"""Model sync: a signed static registry, a verified pull, a validation gate and an atomic switch.

The site side owns the models folder; the agent only loads what ``DIR/active`` points to
(``sync.activation.active_bundle``).
"""
