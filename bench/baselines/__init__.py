"""Baselines measured side by side with productd: a do-nothing ceiling and a naive one-process peer."""
