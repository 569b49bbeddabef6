"""Training: two-tower retrieval and DLRM ranking in plain PyTorch, evaluation, export."""
