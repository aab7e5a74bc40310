"""Pure compute for raymerge: merge kernels, the safetensors format, task bodies. No Ray here."""
