"""Evaluation metrics on embeddings and scores, in NumPy (no TensorFlow import).

One module per protocol, imported by path, e.g.
`from sparse_embed.metrics.verification import verification_metrics`:
`verification` (pairs: k-fold accuracy, ROC, AUC, EER, TAR@FAR).
"""
