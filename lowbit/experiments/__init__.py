"""Experiment support: offline datasets (:mod:`.data`) and plain models (:mod:`.models`)."""
