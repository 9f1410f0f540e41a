"""PyTorch interop: the weight layout, a PyTorch port of the encoder, export and import."""
