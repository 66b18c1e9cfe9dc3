"""podcap.api.v1: generated protobuf and gRPC modules for CaptureService and AgentService."""
