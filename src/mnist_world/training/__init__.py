"""The training run: optimiser and step, epochs, validation, the run folder (resume, lock), logging
and DistributedDataParallel."""
