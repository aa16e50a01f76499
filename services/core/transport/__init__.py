"""Bulk data transports between pods (the control path is gRPC; see proto/).

`nixl_agent.py` wraps a NIXL agent (UCX backend: RDMA where the host has it, shared memory or TCP
otherwise) behind a small typed interface: register host tensors once, exchange metadata as bytes,
WRITE descriptor lists with a notification, poll with a deadline.
"""
