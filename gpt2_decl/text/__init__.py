"""Text: the tokenizer, and generating tokens with a model."""
