"""Generated Python code of the v1 API (``proto/ncserve/v1/ncserve.proto``).

Do not edit the ``*_pb2*`` modules: change the .proto and run
``python scripts/gen_proto.py``; tests/test_proto_stale.py fails when they are stale.
"""
