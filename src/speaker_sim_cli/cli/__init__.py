"""The command line: a Typer app with one module per command. The only layer that prints."""
