"""The package version (``pyproject.toml`` declares the same)."""
__version__ = "0.1.0"
