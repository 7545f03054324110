"""The package version (a leaf module: reports read it without importing the package root)."""

__version__ = "0.1.0"
