"""Offline export: a causal LM (GGUF file or Hugging Face directory) -> ONNX directory + manifest.

Importing this package is cheap: torch, transformers and Optimum are imported
only by `lmscore.export.convert` and `lmscore.export.validate`, so the server
may use `lmscore.export.manifest` and `lmscore.export.graph_io` without them.
"""
