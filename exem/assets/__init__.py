"""Data files shipped with exem (the built-in EM segmenter)."""
