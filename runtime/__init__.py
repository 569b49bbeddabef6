"""Request-time code shared by offline stages and the server: the step classes of the graph, the
NumPy feature transform and user store, the recall routes and FAISS search, the in-process pipeline.
Imports only the core (shoprec) and NumPy / ONNX Runtime / FAISS: it runs in the serving image."""
