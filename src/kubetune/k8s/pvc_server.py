"""The data-access pod's server (`kubetune copy`): files in and out of a PVC, reached only through the
Kubernetes API server's pod proxy. Standard library only — it runs as `python3 -c SOURCE ROOT PORT
IDLE` in any image with Python 3.8+, without kubetune installed.

Every request but /healthz carries the copy's one-time token (X-Kubetune-Token; the pod reads it
from a Secret): anything else in the cluster that reaches the pod's IP gets a 403. Paths are
relative to ROOT (the claim's mount); `..`, absolute paths and symlinks that lead out of ROOT are
refused. A file is written to a temporary name and renamed, so an interrupted copy never leaves a
file that looks complete. The server exits after IDLE seconds without a request.

  GET /healthz              → 200
  GET /list?path=REL        → {"files": [[relative path, size], ...]} of REL (a file: [["", size]]); 404 if absent
  GET /file?path=REL        → the bytes
  PUT /file?path=REL        → 201 (Content-Length required)
"""

import hmac
import json
import os
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PART = ".kubetune-part"
CHUNK = 1 << 20


def main(argv):
    root, port, idle = os.path.realpath(argv[1]), int(argv[2]), float(argv[3])
    token = os.environ.get("KUBETUNE_COPY_TOKEN", "").encode()
    if len(token) < 32:
        sys.exit("kubetune copy: KUBETUNE_COPY_TOKEN is missing or short")
    last = [time.monotonic()]

    def target(rel):
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if rel.startswith("/") or any(p == ".." or "\0" in p for p in parts):
            raise ValueError(rel)
        real = os.path.realpath(os.path.join(root, *parts))
        if real != root and not real.startswith(root + os.sep):
            raise ValueError(rel)  # a symlink inside the volume that leads out of it
        return real

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, code, body=None):
            data = json.dumps(body if body is not None else {}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def path_of(self):
            """(route, absolute path) of an authorised request, or None once it was answered."""
            last[0] = time.monotonic()
            url = urlsplit(self.path)
            if not hmac.compare_digest(self.headers.get("X-Kubetune-Token", "").encode(), token):
                self.reply(403, {"error": "forbidden"})
                return None
            try:
                return url.path, target(parse_qs(url.query).get("path", [""])[0])
            except ValueError:
                self.reply(400, {"error": "a path inside the volume, without .."})
                return None

        def do_GET(self):  # noqa: N802
            if urlsplit(self.path).path == "/healthz":
                return self.reply(200, {"ok": True})
            found = self.path_of()
            if found is None:
                return None
            route, path = found
            if route == "/list":
                if os.path.isfile(path):
                    return self.reply(200, {"files": [["", os.path.getsize(path)]]})
                if not os.path.isdir(path):
                    return self.reply(404, {"error": "not found"})
                files = []
                for folder, dirs, names in os.walk(path):  # symlinks are neither followed nor listed
                    dirs.sort()
                    for name in sorted(names):
                        full = os.path.join(folder, name)
                        info = os.lstat(full)
                        if stat.S_ISREG(info.st_mode) and not name.endswith(PART):
                            files.append([os.path.relpath(full, path).replace(os.sep, "/"), info.st_size])
                return self.reply(200, {"files": files})
            if route == "/file":
                if not os.path.isfile(path):
                    return self.reply(404, {"error": "not found"})
                with open(path, "rb") as f:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
                    self.end_headers()
                    while True:
                        chunk = f.read(CHUNK)
                        if not chunk:
                            return None
                        self.wfile.write(chunk)
                        last[0] = time.monotonic()
            return self.reply(404, {"error": "no such route"})

        def do_PUT(self):  # noqa: N802
            found = self.path_of()
            if found is None:
                return None
            route, path = found
            length = self.headers.get("Content-Length")
            if route != "/file" or os.path.isdir(path) or length is None or not length.isdigit():
                return self.reply(400, {"error": "PUT /file?path=FILE with a Content-Length"})
            os.makedirs(os.path.dirname(path), exist_ok=True)
            part, left = path + PART, int(length)
            with open(part, "wb") as f:
                while left:
                    chunk = self.rfile.read(min(CHUNK, left))
                    if not chunk:
                        break
                    f.write(chunk)
                    left -= len(chunk)
                    last[0] = time.monotonic()
            if left:
                os.remove(part)
                return self.reply(400, {"error": "the body ended early"})
            os.replace(part, path)
            return self.reply(201, {"size": int(length)})

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True

    def watch():
        while time.monotonic() - last[0] < idle:
            time.sleep(min(5.0, idle))
        os._exit(0)  # nobody asked for anything for IDLE seconds: the copy is over or its client gone

    threading.Thread(target=watch, daemon=True).start()
    print(f"kubetune copy: serving {root} on :{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv)
