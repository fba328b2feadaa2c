"""Model zoo: the registry, the weight lookup and one module per architecture family."""
