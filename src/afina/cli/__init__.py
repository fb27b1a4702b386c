"""The `afina` command line: one module per noun."""
