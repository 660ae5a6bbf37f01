"""Frames in, tokens out: the sources (generated, canonical download, local file), downsampling,
quantization into token stores, and the training dataset read from them."""
