"""Model runtimes: the interface the mesh uses, its gRPC client, and the built-in ONNX runtime."""
