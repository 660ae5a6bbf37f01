"""A reproducible world-model lab for Moving MNIST: token stores, ego actions, a masked-token
spatio-temporal transformer, iterative-unmasking sampling and metrics."""
