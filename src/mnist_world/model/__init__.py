"""The masked-token spatio-temporal transformer, the training objectives that say what is hidden,
the iterative-unmasking sampler and the self-describing checkpoints."""
