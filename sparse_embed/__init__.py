"""sparse-embed: face recognition and metric learning with sparse, fast-to-search embeddings.

Importing the package is cheap: it must not import TensorFlow.
"""

__version__ = "0.1.0"
