"""batchkimi's version (one place: the package, the manifest and the User-Agent read it)."""

__version__ = "0.1.0"
