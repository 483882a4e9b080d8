"""Generated protobuf and gRPC code (see scripts/gen_protos.py); do not edit by hand."""
