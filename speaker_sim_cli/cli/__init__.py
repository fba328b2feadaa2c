"""The command line: a Typer app with one module per command. Parses, validates, calls the
library, renders with Rich and maps errors to exit codes. The only layer that prints; nothing
imports it.
"""
