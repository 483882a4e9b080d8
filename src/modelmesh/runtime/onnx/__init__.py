"""The built-in ONNX runtime: onnxruntime behind the ModelRuntime SPI and the KServe v2 data plane.

``tensors`` converts v2 tensors to numpy and back, ``scan`` reads an ONNX file's layout cheaply,
``models`` keeps the loaded models and measures their memory, ``server`` serves both gRPC services.
"""
