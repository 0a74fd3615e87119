"""Distribution: the process group, the device mesh and the parallelisms applied to a model."""
