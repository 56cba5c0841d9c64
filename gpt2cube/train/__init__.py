"""Training small GPT-2s from scratch, and the n-gram baselines measured on the same tokens."""
