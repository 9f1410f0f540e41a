"""The codec path: decode, codec signals, patch scoring and selection."""
