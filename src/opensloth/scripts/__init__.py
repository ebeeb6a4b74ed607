"""Command-line entry points kept at the original OpenSloth's module paths."""
