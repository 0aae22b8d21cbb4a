"""Speed-ups applied from outside the model, switched on where they are asked for."""
