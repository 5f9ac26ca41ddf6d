"""The OpenAI wire format the server speaks: request schemas (pydantic, so a wrong type is a 400
naming the field) and the error body every 4xx/5xx carries:
``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from ..errors import LabError
from ..sampling import SamplingError, SamplingParams

Number = Union[StrictInt, StrictFloat]


class APIError(LabError):
    """An error the server answers with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None          # OpenAI's default is 1; the kit's server is greedy unless asked
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None             # an extension (vLLM and TGI take it too)
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stop_token_ids: Optional[list[StrictInt]] = None   # an extension (vLLM's name)
    stream: StrictBool = False
    n: StrictInt = 1
    user: Optional[StrictStr] = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The request's SamplingParams; a bad value is an APIError naming the field."""
        if self.n != 1:
            raise APIError(400, f"n = {self.n} is not supported: this server returns one choice per request "
                                "(send n requests)", param="n", code="unsupported_value")
        kw = dict(temperature=0.0 if self.temperature is None else self.temperature,
                  top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, seed=self.seed,
                  stop_token_ids=tuple(self.stop_token_ids or ()),
                  stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
                  max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens)
        try:
            return SamplingParams(**kw)
        except (SamplingError, TypeError, ValueError) as e:
            param = next((k for k in kw if str(e).startswith(k)), None)
            raise APIError(400, str(e), param=param, code="invalid_value") from None


class CompletionRequest(_Sampled):
    prompt: Union[StrictStr, list[StrictInt]]     # one prompt: text, or token ids
    echo: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr


class ChatRequest(_Sampled):
    messages: list[ChatMessage]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
