"""Measuring instruments: classification, review-flag and mask metrics (`metrics`), mask-threshold
calibration (`calibration`), `axx-backend evaluate` (`evaluate`) and `axx-backend simulate-al`
(`simulate`); `commands.register` adds both subcommands to the CLI.

Nothing is imported here, so that building the CLI parser does not import torch.
"""
