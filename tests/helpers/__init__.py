"""Shared test helpers: synthetic shards, tolerances, compile-only TPU targets."""
