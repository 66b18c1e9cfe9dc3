"""The `podcap` command line: support-staff client commands and the controller/agent entry points."""

import os

# gRPC's C core logs failed TLS handshakes and the like straight to stderr; a person reads the one-line error
# the command prints instead. Set before grpc is first imported; an explicit GRPC_VERBOSITY still wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from ._main import kubectl_main, main

__all__ = ["kubectl_main", "main"]
