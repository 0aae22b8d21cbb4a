"""The model: configuration, layers, composition, cache, checks and compilation."""
