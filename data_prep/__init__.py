"""Offline data preparation: codec patchification (Beam), teachers and concept clustering."""
