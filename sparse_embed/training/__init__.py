"""Training: the Keras trainer, its callbacks, LR schedules and the distribution strategy."""
