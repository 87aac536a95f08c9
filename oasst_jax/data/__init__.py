"""Dataset loading for the pretokenizer: upstream-format readers yielding conversations."""
