"""mirror: train, tune and track digital-mirror-universe models of patient health records on Ray."""

__version__ = "0.1.0"
