"""The hypercube over each FFN layer's neurons: topology, router calibration, the
function-preserving neuron permutation, the concept map and their GGUF metadata."""
