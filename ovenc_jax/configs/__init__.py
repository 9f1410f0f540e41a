"""Experiment configs as data: `get_config(arg)` modules built from plain values and light defaults modules."""
