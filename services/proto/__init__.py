"""Generated protobuf and gRPC stubs of `proto/disagg/v1/*.proto`; regenerate with `make proto`.

Layout: protoc runs with `-I proto` and writes into this folder, so the generated modules live at
`services/proto/disagg/v1/*_pb2.py` and import each other as `from disagg.v1 import tensor_pb2`
(their import paths mirror the .proto paths, as protoc always does). This package puts its own
folder on `sys.path` so those imports resolve, and re-exports the modules; code imports them as

    from services.proto import attention_pb2, attention_pb2_grpc, tensor_pb2

`tests/unit/test_proto_stubs.py` fails when the files here differ from a fresh generation.
"""

from __future__ import annotations

import sys
from pathlib import Path

_GENERATED_ROOT = str(Path(__file__).resolve().parent)
if _GENERATED_ROOT not in sys.path:
    sys.path.append(_GENERATED_ROOT)

from disagg.v1 import (  # noqa: E402
    attention_pb2,
    attention_pb2_grpc,
    decode_pb2,
    decode_pb2_grpc,
    placement_pb2,
    prefill_pb2,
    prefill_pb2_grpc,
    tensor_pb2,
)

__all__ = [
    "attention_pb2",
    "attention_pb2_grpc",
    "decode_pb2",
    "decode_pb2_grpc",
    "placement_pb2",
    "prefill_pb2",
    "prefill_pb2_grpc",
    "tensor_pb2",
]
