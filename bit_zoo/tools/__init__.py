"""The command-line tools behind `python -m bit_zoo.<tool>`; each is wiring over the library."""
