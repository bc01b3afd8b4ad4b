"""`kaleido serve`: a registered version behind MLflow's own scoring app, with the bounds a shared endpoint needs.

MLflow's pyfunc server (`mlflow models serve`) parses requests and calls the model; it queues every request it
gets, lets a timed-out request's generation run on (the client gets a 504 after MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT,
the GPU keeps working), drops params the signature does not name with only a server-side warning, and answers a
failed request with its own text and a stack trace. `kaleido serve` keeps MLflow's app (`scoring_server.init`:
/ping, /health, /version, /invocations, MLflow's request formats) and wraps /invocations in `Bounded`, an ASGI
layer that, in order:
1. refuses a body over serve.max_request_bytes (413) and anything but JSON (415), from the headers;
2. admits at most serve.concurrency requests (their bodies, checks and generations); one more is answered 503 with
   Retry-After (serve.retry_after_s) before its body is read, never queued, so memory stays bounded by the limits
   times the concurrency;
3. reads the rows of any of MLflow's JSON formats (dataframe_records, dataframe_split, instances, inputs) and hands
   them to MLflow's app as dataframe_records, and checks the whole request as MLflow will parse it
   (kaleido.serve_requests.check_rows: unknown params and input fields named, settings and their types, text fields,
   reference sizes, the cost model of kaleido/request_limits.py, per row and for all rows): 400 before any model work;
4. cancels a generation whose request passed serve.timeout_s (504) or whose client went away: the model checks
   kaleido.serve_requests.CANCEL between denoising steps, and the slot is freed only once the generation has stopped;
5. answers every refusal as {"error_code", "message"} with our one-line reason and never a stack trace (a fault of
   the server is logged there with its traceback and answered 500 naming only the exception's type).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from typing import Any

from kaleido.request_limits import LimitError, Limits
from kaleido.serve_requests import CANCEL, check_rows, one_line, request_rows
from kaleido.serving import ServingError

log = logging.getLogger("kaleido.serve")

INVOCATIONS = "/invocations"
JSON = b"application/json"
Message = dict[str, Any]


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": one_line(message)}).encode()


async def _respond(send: Any, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = _error_body(code, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", JSON), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def _reason(status: int, body: bytes) -> tuple[str, str]:
    """(error code, our one-line message) of an error response MLflow's app produced."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return ("BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"), body.decode(errors="replace")
    if not isinstance(parsed, dict):
        return "BAD_REQUEST", str(parsed)
    message = str(parsed.get("message", ""))
    trace = str(parsed.get("stack_trace") or "")
    if trace:  # an unexpected exception inside predict: a fault of the server, not of the request
        log.error("a request failed inside the model:\n%s", trace)
        kind = (trace.strip().splitlines() or ["an exception"])[-1].split(":")[0]
        return "INTERNAL_ERROR", f"the server failed on this request ({kind}); its log has the details"
    # MLflow wraps a model's refusal as "Failed to predict data '<the whole request>'. \nError: <ours>"
    return str(parsed.get("error_code", "BAD_REQUEST")), message.rpartition("\nError: ")[2] or message


class Bounded:
    """The ASGI layer around MLflow's scoring app (see the module docstring)."""

    def __init__(self, app: Any, model: Any, config: dict[str, Any], limits: Limits, *, concurrency: int,
                 retry_after_s: int, timeout_s: float, max_request_bytes: int):
        self.app = app
        self.model = model  # MLflow's PyFuncModel: its metadata parses requests as the scoring app does
        self.config = config
        self.limits = limits
        self.concurrency = concurrency
        self.retry_after_s = retry_after_s
        self.timeout_s = timeout_s
        self.max_request_bytes = max_request_bytes
        self.running = 0  # generations in flight (changed only on the event loop's thread)

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path", "").rstrip("/") != INVOCATIONS:
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await _respond(send, 405, "BAD_REQUEST", "POST a JSON request to /invocations")
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode() or "0"
        if not declared.isdigit() or int(declared) > self.max_request_bytes:
            await self._too_large(send, declared)
            return
        if headers.get(b"content-type", b"").split(b";")[0].strip().lower() != JSON:
            await _respond(send, 415, "BAD_REQUEST", "send the request as application/json (dataframe_records, "
                           "dataframe_split, inputs or instances, and params)")
            return
        if self.running >= self.concurrency:  # before its body is read: a busy server holds no more requests
            await _respond(send, 503, "TEMPORARILY_UNAVAILABLE", f"busy: {self.running} request(s) running, "
                           f"the limit is {self.concurrency} (serve.concurrency); retry after {self.retry_after_s} s",
                           [(b"retry-after", str(self.retry_after_s).encode())])
            return
        self.running += 1  # the slot is this request's from here: its body, its check, its generation
        try:
            body = await self._read_body(receive)
            if body is None:
                return  # the client left
            if len(body) > self.max_request_bytes:  # sent without a length (chunked), or more than it declared
                await self._too_large(send, f"more than {self.max_request_bytes:,}")
                return
            problem, body = await asyncio.to_thread(self._check, body)
            if problem is not None:
                await _respond(send, 400, "INVALID_PARAMETER_VALUE", problem)
                return
            await self._generate(scope, receive, send, body)
        finally:
            self.running -= 1

    async def _too_large(self, send: Any, size: str) -> None:
        await _respond(send, 413, "REQUEST_LIMIT_EXCEEDED", f"request body of {size} bytes; the limit is "
                       f"{self.max_request_bytes:,} (serve.max_request_bytes): send smaller reference images")

    async def _read_body(self, receive: Any) -> bytes | None:
        """The request's body (at most one byte past the limit is kept), or None when the client left."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if size <= self.max_request_bytes:
                chunks.append(chunk[: self.max_request_bytes + 1 - size])
            size += len(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _check(self, body: bytes) -> tuple[str | None, bytes]:
        """(our reason to refuse the request or None, the body MLflow's app gets): the rows of any of MLflow's
        request formats (kaleido.serve_requests.request_rows) as dataframe_records, parsed exactly as MLflow's app
        will parse them, then checked whole (check_rows)."""
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import _parse_json_data

        try:
            raw = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return f"the request body is not valid UTF-8 JSON ({exc.__class__.__name__}: {str(exc)[:200]})", body
        if not isinstance(raw, dict):
            return "the request must be a JSON object (dataframe_records, dataframe_split, inputs or instances)", body
        params = raw.get("params")
        if params is not None and not isinstance(params, dict):
            return "params must be an object of settings", body
        try:
            # MLflow's instances / inputs parsing makes numpy arrays of the rows (and fails on reference lists of
            # different lengths): every format reaches it as dataframe_records, which it parses row by row
            rows = request_rows(raw)
            check_rows(self.config, rows, params, self.limits)  # the rows as sent: our reasons, before MLflow's
            # a row without references has none (MLflow cannot convert a column that is null in some rows)
            rows = [{**row, "references": row.get("references") or []} for row in rows]
            text = json.dumps({"dataframe_records": rows, **({"params": params} if params else {})})
            parsed = _parse_json_data(text, self.model.metadata, self.model.metadata.get_input_schema())
            check_rows(self.config, parsed.data, params, self.limits)  # and as MLflow's app will hand them over
        except (ServingError, LimitError) as exc:
            return str(exc), body
        except MlflowException as exc:
            return exc.message, body
        return None, text.encode()

    async def _generate(self, scope: Message, receive: Any, send: Any, body: bytes) -> None:
        """Run MLflow's app on the request; stop the generation on a timeout or a departed client."""
        cancel = threading.Event()
        finished = asyncio.Event()
        started: Message = {}
        parts: list[bytes] = []
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await finished.wait()  # nothing may cancel the model's call from outside: it stops at a step boundary
            return {"type": "http.disconnect"}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        async def client_left() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        token = CANCEL.set(cancel.is_set)
        try:
            inner = asyncio.create_task(self.app(scope, replay, capture))  # the task copies CANCEL's context
        finally:
            CANCEL.reset(token)
        watcher = asyncio.create_task(client_left())
        try:
            done, _ = await asyncio.wait({inner, watcher}, timeout=self.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if inner in done:
                fault = inner.exception()
                if fault is not None:  # the app itself failed: logged here, named by type to the caller
                    log.error("a request failed in the scoring app", exc_info=fault)
                    await _respond(send, 500, "INTERNAL_ERROR", f"the server failed on this request "
                                   f"({type(fault).__name__}); its log has the details")
                    return
                await self._forward(send, started, b"".join(parts))
                return
            cancel.set()
            if watcher in done:
                log.warning("the client left before its video was ready: stopping its generation")
            else:
                log.warning("a request passed serve.timeout_s=%s: stopping its generation", self.timeout_s)
                await _respond(send, 504, "DEADLINE_EXCEEDED", f"the generation took longer than "
                               f"{self.timeout_s:g} s (serve.timeout_s) and was stopped; ask for fewer frames or "
                               "steps, or use the kaleido/generate deployment for long videos")
            loop = asyncio.get_running_loop()
            stopping = loop.time()
            await asyncio.wait({inner})  # the slot is free only once the generation has actually stopped
            if not inner.cancelled() and inner.exception() is not None:
                log.error("a cancelled request failed in the scoring app", exc_info=inner.exception())
            log.warning("the generation stopped %.1f s after it was told to", loop.time() - stopping)
        finally:
            finished.set()
            watcher.cancel()

    async def _forward(self, send: Any, started: Message, body: bytes) -> None:
        status = int(started.get("status", 500))
        if status < 400:
            await send({"type": "http.response.start", "status": status, "headers": started.get("headers", [])})
            await send({"type": "http.response.body", "body": body})
            return
        code, message = _reason(status, body)
        await _respond(send, 500 if code == "INTERNAL_ERROR" else status, code, message)


def build_app(model_uri: str, params: Any) -> Any:
    """The bounded app for `model_uri` (loaded with mlflow.pyfunc; its files checked against its manifest) with the
    serve.* settings of `params`, which also replace the version's registered request limits."""
    import mlflow.pyfunc
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server

    serve = params.serve
    # MLflow's own timeout would answer 504 and leave the generation running: ours governs, theirs stays out of it
    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(int(serve.timeout_s) + 24 * 3600)
    model = mlflow.pyfunc.load_model(model_uri)
    python_model = model.unwrap_python_model()
    if not isinstance(getattr(python_model, "config", None), dict):
        from kaleido.serving import ServingError

        raise ServingError(f"{model_uri} is an MLflow Model but not a Kaleido version ({type(python_model).__name__} "
                           "has no model config); serve a version registered by `kaleido register` or the flow")
    limits = Limits.from_params(params)
    python_model.config["limits"] = limits.to_config()  # pyfunc's predict checks the same limits
    return Bounded(scoring_server.init(model), model, python_model.config, limits, concurrency=serve.concurrency,
                   retry_after_s=serve.retry_after_s, timeout_s=serve.timeout_s,
                   max_request_bytes=serve.max_request_bytes)
