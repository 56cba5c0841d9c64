"""Calibration without training: importance matrices (llama-imatrix format) and the statistics they need."""
