"""Experiment configs as code: `get_config(arg)` modules and the defaults they start from."""
