"""Evaluation metrics on embeddings and scores, in NumPy (no TensorFlow import).

One module per protocol, imported by path, e.g.
`from sparse_embed.metrics.verification import verification_metrics`:
`verification` (pairs: k-fold accuracy, ROC, AUC, EER, TAR@FAR).
`retrieval` (open set: Recall@K, MAP@R, R-precision, Precision@1; `evaluate retrieval`).
`sparsity` (nnz, FLOPs per pair, R_sub, all-zero embeddings; `evaluate sparsity`).
`identification` (MegaFace distractors: CMC, Recall@K of sparse, dense, re-ranked; `evaluate identification`).
`uncertainty` (whether a predicted confidence tells good inputs from bad: confidence AUROC, AUPR,
the risk-coverage curve and its area, error-versus-reject retrieval metrics).
"""
