"""One module per CLI command; each imports torch/transformers only inside the command body."""
