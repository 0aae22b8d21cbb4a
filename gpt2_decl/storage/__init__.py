"""Files: atomic writes, and checkpoints in the Hugging Face layout."""
