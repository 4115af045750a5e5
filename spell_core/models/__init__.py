"""The decoder and its weights: RoPE, the model, checkpoint formats, named assets and the hub."""
