"""The descriptor pool that holds modelmesh's protos.

A private pool, not protobuf's default one: tritonclient and MLServer register messages with the
same full names (``inference.ModelInferRequest`` ...) in the default pool, and a second registration
of a name fails. Keeping ours apart lets both live in one process. Reflection is served from here.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
