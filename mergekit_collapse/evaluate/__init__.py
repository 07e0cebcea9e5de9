"""Evaluation: lm-eval on the merge and its constituents (`harness`), merging loss (`observed`)."""
