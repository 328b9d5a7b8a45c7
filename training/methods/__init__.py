"""Continual-learning methods: ``base`` (the interface), ``hnet`` (the paper's), ``baselines``
(fine-tuning, independent networks, EWC, SI) and ``registry`` (by name)."""
