"""Serving: the Triton steps (NumPy / ONNX Runtime / FAISS only), the repository generator,
the launcher, and the in-process reference pipeline. No NVTabular, no pandas, no pickles."""
