"""pmfs: a crash-consistent persistent-memory file system served through FUSE."""

__version__ = "0.1.0"
