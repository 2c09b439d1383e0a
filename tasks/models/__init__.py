"""Models: flavours, the registered pyfunc wrappers, model cards and promotion."""
