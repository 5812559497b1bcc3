"""Distributed training: strategy selection from the recipe (``train.strategy``)."""
