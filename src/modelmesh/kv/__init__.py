"""Key-value stores behind one interface: in-memory (single node) and etcd (cluster)."""
