"""The jit-compiled train step, its optimizer, the train loop, and the TPU plan that compiles it for a slice."""
