"""The application layer: the `shoprec` command, the one place that imports every stage."""
