"""The endpoint's front door: one ASGI middleware around vLLM's own OpenAI app (or the A/B ingress).

It does what vLLM's server leaves to a deployment, before the request touches the engine:
- API keys (`Authorization: Bearer`), compared in constant time; a missing or wrong key gets a 401.
- Only the public routes are reachable; vLLM's admin routes (LoRA load/unload, which runtime LoRA resolution
  switches on) answer 404 instead of letting any caller load a path.
- Bodies are bounded, UTF-8 and a JSON object, checked once here so that every bad request gets an OpenAI-style
  `{"error": {...}}` 4xx; any error body that comes back from below as `{"detail": ...}` is rewritten to that shape.
- Each response carries `x-raylm-version`; TTFT, time per output token, latency, tokens and status are recorded
  per version (`serve/stats.py`).
It is a plain ASGI class, not a Starlette `BaseHTTPMiddleware`, so streamed chunks pass through without an extra
task or queue per request.
"""
from __future__ import annotations

import hmac
import json
import os
import time

PUBLIC_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/version",
                 "/metrics", "/raylm/stats", "/tokenize", "/detokenize")
OPEN_ROUTES = ("/health", "/ready")  # probes of load balancers and Kubernetes carry no key
VERSION_HEADER = "x-raylm-version"
UNROUTED = "unrouted"  # metrics label of requests refused before the A/B ingress chose a version
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 405: "MethodNotAllowedError", 413: "RequestTooLargeError",
               415: "UnsupportedMediaTypeError", 422: "BadRequestError", 429: "RateLimitError"}


def load_api_keys(env_var: str = "RAYLM_API_KEYS", keys_file: str | None = None) -> list[str]:
    """Keys from a comma-separated environment variable and/or a file (one per line, `#` comments)."""
    keys = [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]
    if keys_file:
        with open(os.path.expanduser(keys_file)) as f:
            keys += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    return keys


def client_key(env_var: str = "RAYLM_API_KEYS", keys_file: str | None = None) -> str | None:
    """The key a client on this machine sends: $RAYLM_API_KEY, else the first configured server key."""
    return os.environ.get("RAYLM_API_KEY") or next(iter(load_api_keys(env_var, keys_file)), None)


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    etype = ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return json.dumps({"error": {"message": message, "type": etype, "param": param, "code": status}}).encode()


async def _respond(send, status: int, message: str, version: str | None, param: str | None = None) -> None:
    body = error_body(status, message, param)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if version:
        headers.append((VERSION_HEADER.encode(), version.encode()))
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def _openai_error(raw: bytes, status: int) -> bytes:
    """An error body from below in OpenAI's shape (FastAPI and Ray Serve LLM answer some with `detail`)."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_body(status, raw.decode("utf-8", "replace")[:500] or f"HTTP {status}")
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return raw
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    if isinstance(detail, list):  # FastAPI validation errors: name the fields
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
                           if isinstance(d, dict) else str(d) for d in detail)
    return error_body(status, str(detail))


class Guard:
    """ASGI middleware. `version`: the name this deployment answers as (None behind the A/B ingress, which sets
    the header itself). `recorder` (default: the replica's `serve.stats.Recorder`) gets one `record(version,
    status, ttft_s, latency_s, output_tokens, stream)` per API request, rejected ones included."""

    def __init__(self, app, *, api_keys_env: str = "RAYLM_API_KEYS", api_keys_file: str | None = None,
                 version: str | None = None, max_body_bytes: int = 1 << 20, recorder=None,
                 extra_routes: tuple[str, ...] = ()):
        # Keys are read here, in the replica (Starlette builds the middleware stack on the first request), so they
        # never travel in the application's arguments.
        self.app = app
        self.keys = [k.encode() for k in load_api_keys(api_keys_env, api_keys_file)]
        self.version = version
        self.max_body = max_body_bytes
        self._recorder = recorder
        self.routes = PUBLIC_ROUTES + tuple(extra_routes)

    @property
    def recorder(self):
        if self._recorder is None:
            from serve import stats

            return stats.RECORDER
        return self._recorder

    async def _reject(self, scope, send, status: int, message: str) -> None:
        await _respond(send, status, message, self.version)
        rec = self.recorder
        if rec is not None and scope["path"].startswith("/v1/"):
            rec.record(self.version or UNROUTED, status, 0.0, 0.0, 0, False)

    def _authorized(self, scope) -> bool:
        if not self.keys:
            return True
        auth = _header(scope, b"authorization") or ""
        token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
        # compare against every key so the time taken does not tell which prefix matched
        return bool(token) and sum(hmac.compare_digest(token, k) for k in self.keys) > 0

    async def _read_body(self, scope, receive, send) -> bytes | None:
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            await self._reject(scope, send, 413, f"request body of {declared} bytes is over the limit of {self.max_body}")
            return None
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._reject(scope, send, 413, f"request body is over the limit of {self.max_body} bytes")
                return None
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        if not (path in self.routes or path.startswith("/v1/models/")):
            return await self._reject(scope, send, 404, f"no route {scope['method']} {scope['path']}")
        if path not in OPEN_ROUTES and not self._authorized(scope):
            return await self._reject(scope, send, 401, "missing or invalid API key (send `Authorization: Bearer KEY`)")
        if scope["method"] == "POST":
            raw = await self._read_body(scope, receive, send)
            if raw is None:
                return
            message = self._invalid_json(raw)
            if message:
                return await self._reject(scope, send, 400, message)
            receive = _replay(raw, receive)
        await self._forward(scope, receive, send)

    @staticmethod
    def _invalid_json(raw: bytes) -> str | None:
        if not raw.strip():
            return "empty request body: send a JSON object"
        try:
            payload = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return f"request body is not valid UTF-8 (byte {exc.start})"
        except json.JSONDecodeError as exc:
            return f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        if not isinstance(payload, dict):
            return f"request body must be a JSON object, got {type(payload).__name__}"
        return None

    async def _forward(self, scope, receive, send):
        t0 = time.perf_counter()
        state = {"status": 500, "first": None, "chunks": 0, "error": None, "version": self.version,
                 "json": bytearray()}

        async def wrapped_send(msg):
            if msg["type"] == "http.response.start":
                state["status"] = msg["status"]
                headers = list(msg.get("headers", []))
                seen = {k.lower(): v for k, v in headers}
                if VERSION_HEADER.encode() in seen:
                    state["version"] = seen[VERSION_HEADER.encode()].decode()
                elif self.version:
                    headers.append((VERSION_HEADER.encode(), self.version.encode()))
                state["stream"] = seen.get(b"content-type", b"").startswith(b"text/event-stream")
                if msg["status"] >= 400:  # hold the error back to rewrite its body
                    state["error"] = {**msg, "headers": [h for h in headers if h[0].lower() != b"content-length"]}
                    state["errbody"] = bytearray()
                    return
                msg = {**msg, "headers": headers}
            elif msg["type"] == "http.response.body":
                body = msg.get("body", b"")
                if state["error"] is not None:
                    state["errbody"] += body
                    if msg.get("more_body"):
                        return
                    fixed = _openai_error(bytes(state["errbody"]), state["status"])
                    start = state["error"]
                    start["headers"] = start["headers"] + [(b"content-length", str(len(fixed)).encode())]
                    await send(start)
                    return await send({"type": "http.response.body", "body": fixed})
                if body:
                    if state["first"] is None:
                        state["first"] = time.perf_counter()
                    if state.get("stream"):
                        state["chunks"] += body.count(b"data: {")
                    elif len(state["json"]) < 1 << 20:
                        state["json"] += body
            await send(msg)

        rec = self.recorder if scope["path"].startswith("/v1/") and scope["method"] == "POST" else None
        if rec is not None:
            rec.inflight += 1
        try:
            await self.app(scope, receive, wrapped_send)
        finally:
            if rec is not None:
                rec.inflight -= 1
                end = time.perf_counter()
                stream = bool(state.get("stream"))
                tokens = state["chunks"] if stream else _completion_tokens(state["json"])
                rec.record(state["version"] or UNROUTED, state["status"], (state["first"] or end) - t0, end - t0,
                           tokens, stream)


def _completion_tokens(raw: bytearray) -> int:
    try:
        return int(json.loads(bytes(raw)).get("usage", {}).get("completion_tokens") or 0)
    except (ValueError, AttributeError):
        return 0


def _replay(raw: bytes, receive):
    """A `receive` that hands the already-read body to the app once, then defers to the real channel (so the app
    still sees a client disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()
    return replay
