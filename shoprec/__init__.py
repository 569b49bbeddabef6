"""Shared core of the recommender: config, tensor contract, device choice, artifact manifest.

Every stage (feature_workflows, training, serving, client) imports only this package from the
others; stages hand work to each other through files on disk.
"""

__version__ = "0.1.0"
