"""GPT-2 variants: position schemes (learned, sinusoidal, RoPE, ALiBi, none, KERPLE, FIRE,
head-rotating RoPE) and parallel blocks, as one registered model family. spec.py is torch-free
(the converter reads it); model.py and positions.py hold the torch modules."""
