"""The encoder: a ViT over sparse (t, h, w) token sets with 3D RoPE, its attention and MLP kernels."""
