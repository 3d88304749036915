#!/usr/bin/env python3
"""Container health check: exit 0 when the worker's /healthz answers 200, else 1.

Copied into the images as /usr/local/bin/stream-infer-healthcheck and run by the Dockerfiles'
HEALTHCHECK (the slim and CUDA bases carry no curl or wget). Standard library only.

The port is the worker's web port: STREAM_INFER_WORKER__WEB_PORT when set (the environment
override deploy/compose.yaml uses to give each worker its own port), else 6066, the default
of ``worker.web_port``. A port set only in the topology file must be passed as the first
argument instead: ``stream-infer-healthcheck 7000``.

/healthz is liveness (200 unless the consumer thread failed); /readyz, readiness, is probed
by Kubernetes itself (deploy/k8s/deployment.yaml) and can be checked with
``stream-infer-healthcheck PORT /readyz``.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = "6066"
TIMEOUT_S = 3.0


def check(port: str, path: str = "/healthz", timeout_s: float = TIMEOUT_S) -> int:
    url = f"http://127.0.0.1:{int(port)}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


def main(argv: list[str]) -> int:
    port = argv[0] if argv else os.environ.get("STREAM_INFER_WORKER__WEB_PORT", DEFAULT_PORT)
    path = argv[1] if len(argv) > 1 else "/healthz"
    return check(port, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
