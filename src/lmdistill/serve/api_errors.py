"""Every failure answered with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.

``ApiError`` is raised by the request checks and the routers; ``install_error_handlers`` makes the app answer it
(401 with ``WWW-Authenticate``, 413 closing the connection, 429 with ``Retry-After``), and answers FastAPI's own
404/405 and validation errors, and any other exception (500), in the same shape.
"""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: ApiError):
    """The ``JSONResponse`` of ``err``, with the headers its status asks for."""
    from fastapi.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    if err.status == 413:
        headers = {"Connection": "close"}
    if err.headers:
        headers = {**(headers or {}), **err.headers}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def install_error_handlers(app) -> None:
    """Answer ``ApiError``, Starlette's HTTP errors, request-validation errors and anything else in OpenAI's shape."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        forget_frames(exc)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(ApiError(400, str(exc.errors()[:1])))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))


def forget_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames an error (and the errors it was raised from) went through.

    An error raised in a worker thread reaches the handler through an asyncio future, and the future, the
    error and its traceback form a reference cycle that keeps every frame's locals (a refused request's
    megabytes of body, messages and rendered prompt) alive until the cyclic garbage collector runs, which
    can be never soon: ten refused 5 MB prompts held ~170 MB that way. Clearing the frames frees them now.
    """
    import traceback

    seen = 0
    while exc is not None and seen < 8:
        traceback.clear_frames(exc.__traceback__)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
