"""The package version, in a module of its own: every stage can stamp reports with it without importing the
public API in ``quantkit/__init__`` (which imports the pipeline, and so every stage)."""

__version__ = "0.1.0"
