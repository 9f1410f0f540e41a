"""PyTorch interop: the weight layout, the PyTorch encoder shipped in exports, export and import."""
