"""Pure placement decisions over snapshots: what to evict (and, later, where to load and how many
copies). No asyncio, grpc, store or logging here: same input, same decision, testable alone."""
