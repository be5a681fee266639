"""lmscore server: ONNX Runtime model, scoring core, gRPC servicer. No torch, no transformers."""
