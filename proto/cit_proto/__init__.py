"""The gRPC contract of cit: cit.proto and the stubs generated from it (cit_pb2, cit_pb2_grpc)."""
