"""Hydra entry points: thin wrappers around ``train(cfg)``, ``evaluate(cfg)`` and friends."""
