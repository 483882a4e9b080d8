"""gRPC adapters: servicers for the management API and the data plane, and the error mapping."""
