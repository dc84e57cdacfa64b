"""cit-trainer: task data, task keys, continual training of adapters, and writing them to the registry."""
