"""Ahead-of-time compiles of the train step for TPU and GPU targets, and their HLO traffic."""
