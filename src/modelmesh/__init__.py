"""modelmesh: serve thousands of small models from a few pods behind one KServe v2 gRPC endpoint."""

__version__ = "0.1.0"
