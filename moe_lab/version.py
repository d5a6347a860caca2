"""The package version (a leaf, so that modules deep in the package can read it without importing the package root)."""

__version__ = "0.1.0"
