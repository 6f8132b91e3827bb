"""The package version, in its own module: read by pyproject.toml, the CLI and the file formats without
importing anything heavy."""
__version__ = "0.1.0"
