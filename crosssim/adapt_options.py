"""Test-time adaptation choices, torch-free so the CLI parser can show them cheaply."""

ADAPT_METHODS = ("none", "adabn", "tent", "crosssim", "auto")
ADAPT_BATCH_SIZE = 64  # target images per TENT / crosssim adaptation step
