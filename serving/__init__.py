"""Serving on Triton: the generic python-model adapter, the model repository generator, the
tritonserver command line and launcher. Imports only the core (shoprec) and runtime: no training,
no NVTabular, no pandas, no pickles."""
