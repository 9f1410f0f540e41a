"""Cluster discrimination: margin softmax against sharded concept centers, with Partial FC."""
