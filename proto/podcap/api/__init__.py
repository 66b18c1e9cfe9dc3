"""podcap's gRPC API: the .proto contract and the code generated from it (`make proto`)."""
