"""The server's one error shape, OpenAI's: {"error": {"message", "type", "param", "code"}}.

Its own module so the HTTP handlers (api) and the ASGI guards that answer before any handler
runs (guards) send the same body."""
from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self):
        """The JSON response (an ASGI app too: guards send it without a route)."""
        # Imported here: the CLI's parser reads guards' defaults, and `medqlora validate` should
        # not pay for loading starlette.
        from starlette.responses import JSONResponse
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
