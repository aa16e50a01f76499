"""The model: configuration, weights, tokenizer, and the dense part of the forward pass."""
