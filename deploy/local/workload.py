"""The demo's workload: a small shop API in the checkout pod and a frontend pod calling it in a loop.

`demo.py` runs it inside the pods' network namespaces: `workload.py serve PORT` in the checkout pod and
`workload.py call HOST:PORT` in the frontend pod, so the pods exchange real HTTP for podcap to capture. Standard
library only; every request opens its own connection, so a capture shows whole TCP handshakes.
"""

from __future__ import annotations

import http.client
import itertools
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAUSE_S = 0.2  # ~5 requests a second: enough to see in a 5 s capture, little enough to read


class _ShopApi(BaseHTTPRequestHandler):
    server_version = "shop-checkout/1.0"

    def do_GET(self) -> None:
        if self.path.startswith("/api/cart"):
            self._answer(200, {"items": [{"sku": "mug-blue", "qty": 2}], "total": "19.80"})
        else:
            self._answer(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
        if self.path == "/api/checkout":
            order = json.loads(body or b"{}").get("order")
            self._answer(201, {"order": order, "status": "paid"})
        else:
            self._answer(404, {"error": f"no route {self.path}"})

    def _answer(self, status: int, document: dict[str, object]) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the capture is the log


def serve(port: int) -> None:
    ThreadingHTTPServer(("0.0.0.0", port), _ShopApi).serve_forever()


def call(target: str) -> None:
    host, port = target.rsplit(":", 1)
    for order in itertools.count(1):
        connection = http.client.HTTPConnection(host, int(port), timeout=2)
        try:
            if order % 2:
                connection.request("GET", f"/api/cart?session={order}")
            else:
                payload = json.dumps({"order": order, "items": ["mug-blue", "mug-blue"]})
                connection.request(
                    "POST", "/api/checkout", body=payload, headers={"Content-Type": "application/json"}
                )
            connection.getresponse().read()
        except OSError:
            pass  # the server may not be up yet, or going away: keep calling, like a real frontend
        finally:
            connection.close()
        time.sleep(PAUSE_S)


if __name__ == "__main__":
    mode, where = sys.argv[1], sys.argv[2]
    if mode == "serve":
        serve(int(where))
    else:
        call(where)
