"""Test-time adaptation choices and TENT defaults, torch-free so the CLI parser can show them cheaply."""

ADAPT_METHODS = ("none", "adabn", "tent")
TENT_STEPS = 10  # gradient steps (one target mini-batch each)
TENT_LR = 1e-3  # Adam learning rate on BatchNorm affine parameters (TENT's setting for small models)
TENT_BATCH_SIZE = 64  # target images per TENT step
