"""The shared layer under every stage: atomic writes, sharded zarr stores, devices and precision,
derived seeds, and the pixel metrics that quantization, validation and evaluation all score with."""
