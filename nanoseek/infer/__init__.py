"""Generation over the model's own modules."""
