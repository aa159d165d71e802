"""Runner part: the HTTP side of the runner service (--serve): the request handler, its routes and page.

Python 3.6 syntax; numpy, cv2, the standard library and the bundle's runtime only: assembled into each bundle's
single runner.py (edgeport.bundle.RUNNER_PARTS, in order), where every part's names are one module's.
"""
import hmac
import json
import os
import re
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs, urlparse

from edgeport.runner.images import ImageTooLarge, decode_image

TOKEN_COOKIE = "edgeport_token"


INFER_TIMEOUT = 30.0


HANDLER_NICE = 10  # added to a request thread's nice value: the camera loop's threads come first for the CPUs


OPEN_PATHS = ("/healthz", "/readyz")  # probes answer without the token: they reveal nothing but liveness


def parse_multipart(body, content_type):
    """{field name: bytes} of a multipart/form-data body; the first file part is also under "" ({} when the
    content type names no boundary)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        return {}
    fields = {}
    for part in body.split(b"--" + m.group(1).encode("latin-1")):
        head, sep, data = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        if data.endswith(b"\r\n"):
            data = data[:-2]
        disposition = head.decode("latin-1", "replace")
        name = re.search(r'name="([^"]*)"', disposition)
        if name:
            fields.setdefault(name.group(1), data)
        if "filename=" in disposition:
            fields.setdefault("", data)
    return fields


class Server(ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>edgeport: %(title)s</title>
<style>body{font-family:sans-serif;background:#111;color:#eee;margin:16px}
img{max-width:100%%;border:1px solid #444}ul{list-style:none;padding:0;columns:3}
.sw{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle}
#status{color:#9c9;font-size:90%%}</style></head>
<body><h1>%(title)s</h1>%(stream)s
<p id="status">FPS and latency are drawn on each frame.</p>
<h2>Legend</h2><ul>%(legend)s</ul>
<script>
function poll(){fetch("readyz").then(function(r){return r.json()}).then(function(j){
  document.getElementById("status").textContent=(j.ready?"ready":"not ready")+" | heartbeat "+
  j.heartbeat_age_s.toFixed(1)+" s"}).catch(function(){});}
setInterval(poll,2000);poll();
</script></body></html>
"""


class Handler(BaseHTTPRequestHandler):
    service = None  # set per server
    protocol_version = "HTTP/1.0"
    server_version = "edgeport-runner"

    def log_message(self, fmt, *args):  # quiet: the metrics count requests
        pass

    def setup(self):
        # On Linux a thread's nice value is its own: a request's decoding, drawing and encoding yield the CPUs to
        # the camera loop when both want them (elsewhere this changes the whole process, so it is not done).
        if HANDLER_NICE and sys.platform.startswith("linux"):
            try:
                os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + HANDLER_NICE)
            except (AttributeError, OSError):
                pass
        BaseHTTPRequestHandler.setup(self)

    def _send(self, code, body, ctype="application/json", headers=()):
        self._drain_body()
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if not isinstance(body, bytes):
            body = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.service.count(self.path_only, code)

    def _error(self, code, message):
        self._send(code, {"error": message, "success": False})

    def _drain_body(self):
        """Read the request body nobody read (up to 4x the upload limit) before answering: a client still sending
        it (a POST to a wrong path, a busy or unauthorised answer, an upload over the limit) would otherwise get a
        broken pipe instead of the answer. The connection is closed after the answer."""
        if getattr(self, "body_read", True):
            return
        self.body_read = True
        try:
            left = min(int(self.headers.get("Content-Length") or 0), 4 * self.service.max_body)
        except ValueError:
            left = 0
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
        self.close_connection = True

    def _authorised(self, query):
        token = self.service.token
        if not token or self.path_only in OPEN_PATHS:
            return True
        auth = self.headers.get("Authorization") or ""
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not given:
            for part in (self.headers.get("Cookie") or "").split(";"):
                k, _, v = part.strip().partition("=")
                if k == TOKEN_COOKIE:
                    given = v
        if not given and self.path_only == "/" and query.get("token"):
            given = query["token"][0]
        return bool(given) and hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))

    def _dispatch(self, method):
        svc = self.service
        url = urlparse(self.path)
        self.path_only = url.path
        self.body_read = not self.headers.get("Content-Length")
        query = parse_qs(url.query)
        probe = url.path in OPEN_PATHS  # cheap, and never turned away: a busy service is still alive
        with svc.cond:
            busy = not probe and svc.clients >= svc.max_clients
            if not busy and not probe:
                svc.clients += 1
        if busy:
            return self._error(503, "busy: %d clients already (the runner's --max-clients)" % svc.max_clients)
        try:
            if not self._authorised(query):
                return self._send(401, {"error": "a token is required: Authorization: Bearer TOKEN, or open "
                                                 "/?token=TOKEN once in a browser", "success": False},
                                  headers=(("WWW-Authenticate", 'Bearer realm="edgeport"'),))
            route = ROUTES.get((method, url.path))
            if route is None:
                known = [p for (mth, p) in ROUTES if p == url.path]
                if known:
                    return self._error(405, "%s %s: not allowed" % (method, url.path))
                return self._error(404, "%s: not found (try /, /stream.mjpg, /snapshot.jpg, /healthz, /readyz, "
                                        "/metrics, POST /infer)" % url.path)
            route(self, query)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the client went away
        except Exception as e:  # never reaches the camera loop
            svc.err.write("serve: %s %s failed: %s: %s\n" % (method, url.path, type(e).__name__, e))
            try:
                self._error(500, "%s: %s" % (type(e).__name__, e))
            except Exception:
                pass
        finally:
            if not probe:
                with svc.cond:
                    svc.clients -= 1

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    # ---- routes
    def index(self, query):
        if query.get("token") and self.service.token:  # the browser's first visit: keep it in a cookie
            return self._send(303, b"", "text/plain", headers=(
                ("Location", "/"),
                ("Set-Cookie", "%s=%s; Path=/; HttpOnly; SameSite=Strict" % (TOKEN_COOKIE, query["token"][0]))))
        self._send(200, self.service.page(), "text/html; charset=utf-8")

    def healthz(self, query):
        age = time.time() - self.service.heartbeat
        limit = max(10.0, float(getattr(self.service.args, "timeout", 5.0)) * 4)
        body = {"alive": age <= limit, "heartbeat_age_s": round(age, 3), "limit_s": limit,
                "uptime_s": round(time.time() - self.service.started, 1)}
        self._send(200 if body["alive"] else 503, body)

    def readyz(self, query):
        ok, parts = self.service.readiness()
        self._send(200 if ok else 503, {"ready": ok, "checks": parts,
                                        "heartbeat_age_s": round(time.time() - self.service.heartbeat, 3)})

    def metrics(self, query):
        self._send(200, self.service.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")

    def snapshot(self, query):
        svc = self.service
        if not svc.args.source_open:
            return self._error(404, "no source: this service runs POST /infer only (--no-source)")
        jpeg = svc.jpeg_now(3.0)
        if jpeg is None:
            return self._error(503, "no frame from the source within 3 s")
        self._send(200, jpeg, "image/jpeg")

    def stream(self, query):
        svc = self.service
        if not svc.args.source_open:
            return self._error(404, "no source: this service runs POST /infer only (--no-source)")
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        svc.count(self.path_only, 200)
        with svc.cond:
            svc.streams += 1
        try:
            seq = 0
            while not svc.stopping:
                jpeg, seq = svc.jpeg_after(seq, 1.0)
                if jpeg is None:
                    continue
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg))
                self.wfile.write(jpeg)
                self.wfile.write(b"\r\n")
                self.wfile.flush()
        finally:
            with svc.cond:
                svc.streams -= 1

    def _image(self):
        """(the uploaded image decoded (BGR), the form's other fields); (None, {}) after answering the error."""
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if length < 0:
            self._error(411, "send the image with a Content-Length")
            return None, {}
        if length > self.service.max_body:
            self._error(413, "the upload is %d bytes; the limit is %d (--max-upload-mb)"
                        % (length, self.service.max_body))
            return None, {}
        body = self.rfile.read(length)
        self.body_read = True
        ctype = self.headers.get("Content-Type") or ""
        fields = {}
        if ctype.startswith("multipart/form-data"):
            fields = parse_multipart(body, ctype)
            body = fields.get("image", fields.get("", b""))
        try:
            image = decode_image(body, self.service.max_pixels, what="the upload")
        except ImageTooLarge as e:
            self.close_connection = True
            self._error(413, "%s (the runner's --max-pixels); send a smaller image" % e)
            return None, {}
        if image is None:
            self._error(400, "the upload is not an image OpenCV can decode (send a JPEG or PNG, as the body or "
                             "as the form field 'image')")
            return None, {}
        return image, fields

    def infer(self, query):
        image, _ = self._image()
        if image is not None:
            self._send(200, self.service.infer(image))

    def deepstack(self, query):
        svc = self.service
        task = svc.manifest["preprocess"]["task"]
        if svc.post is None or svc.post.deepstack({}, 0.0) is None:
            return self._error(404, "/v1/vision/detection needs a detection bundle; this one is %s (use POST /infer)"
                               % task)
        image, fields = self._image()
        if image is None:
            return
        try:
            minimum = float(fields.get("min_confidence") or (query.get("min_confidence") or ["0"])[0])
        except ValueError:
            return self._error(400, "min_confidence: give a number from 0 to 1")
        record = svc.infer(image)
        self._send(200, {"success": True, "predictions": svc.post.deepstack(record, minimum),
                         "duration": record["latency_ms"]})


ROUTES = {("GET", "/"): Handler.index, ("GET", "/healthz"): Handler.healthz, ("GET", "/readyz"): Handler.readyz,
          ("GET", "/metrics"): Handler.metrics, ("GET", "/snapshot.jpg"): Handler.snapshot,
          ("GET", "/stream.mjpg"): Handler.stream, ("POST", "/infer"): Handler.infer,
          ("POST", "/v1/vision/detection"): Handler.deepstack}
