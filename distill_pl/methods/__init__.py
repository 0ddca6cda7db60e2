"""Training methods: the networks a loss needs and the loss methods, no Lightning."""
