"""Request parsing and validation for the HTTP API (:mod:`vlmkit.serve.api`): everything between the bytes a
client sends and the values the engine takes, and the error shape of every refusal.

- :class:`ApiError` and :func:`error_body`: a refusal in OpenAI's shape ``{"error": {"message", "type",
  "param", "code"}}`` with its HTTP status;
- :func:`read_json`: the body, bounded by ``max_body_bytes`` (413) and parsed as strict JSON (no NaN);
- the typed field readers (strings, numbers in a range, integers, objects), whose messages name the field;
- :class:`ImageDecoder`: image URLs to RGB images, refusing what is too big (bytes, pixels from the header,
  the pixels of a request together), malformed, in another format than PNG/JPEG/WebP/GIF/BMP, remote, or
  local when local files are not allowed;
- :func:`parse_chat` (with :func:`parse_messages`) and :func:`parse_embeddings`: a request body to the
  engine's messages, image references and :class:`~vlmkit.generation.GenerationConfig`, or to the inputs of
  an embedding request, and the limits they check.

Bodies are checked field by field rather than by pydantic models, so that every refusal is a 4xx whose
message names the field (``messages[1].content[0].image_url``) and no client input reaches a 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import threading
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from fastapi.responses import JSONResponse
from PIL import Image
from starlette.requests import ClientDisconnect, Request

from vlmkit.generation import GenerationConfig

PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # RFC 3986
# formats a request's image may be in; the others PIL knows (EPS runs Ghostscript, TIFF and the rarer ones
# carry more parser surface than a chat image needs) are refused
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_STOP = 4
MAX_EMBED_INPUTS = 2048
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
# request fields OpenAI defines that this server does not implement: refused unless at their default
UNSUPPORTED = {
    "tools": lambda v: not v, "functions": lambda v: not v, "tool_choice": lambda v: v in ("none", "auto"),
    "function_call": lambda v: v in ("none", "auto"), "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v in (0,), "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: v in (0, 0.0), "frequency_penalty": lambda v: v in (0, 0.0),
    "response_format": lambda v: v == {"type": "text"},
}
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings changes process-wide state: one header read at a time


class ApiError(Exception):
    """A refusal in OpenAI's error shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(error_body(self.status, self.message, self.param, self.code), self.status,
                            headers=headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ApiError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# ---------------------------------------------------------------------------------------------- field checks
def _kind(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _text(v, where: str, empty: bool = True) -> str:
    if not isinstance(v, str):
        raise _bad(f"{where} must be a string, got {_kind(v)}", where)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{where} is not valid Unicode (a lone surrogate escape such as \\ud800)", where) from None
    if not empty and not v:
        raise _bad(f"{where} must not be empty", where)
    return v


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"{key} must be a number, got {_kind(v)}", key)
    try:
        v = float(v)
    except OverflowError:  # an integer beyond any float
        v = math.inf if v > 0 else -math.inf
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(f"{key} must be in {interval}, got {v!r}", key)
    return v


def _integer(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{key} must be an integer, got {_kind(v)}", key)
    return v


def _object(body, where: str = "the request body") -> dict:
    if not isinstance(body, dict):
        param = None if where == "the request body" else where
        raise _bad(f"{where} must be a JSON object, got {_kind(body)}", param)
    return body


# ---------------------------------------------------------------------------------------------- images
class ImageDecoder:
    """Image URLs of a request -> RGB PIL images, refusing what is too big, malformed or not allowed."""

    def __init__(self, allow_local_files: bool, max_image_bytes: int, max_image_pixels: int,
                 max_request_pixels: int):
        self.allow_local_files = allow_local_files
        self.max_bytes, self.max_pixels = max_image_bytes, max_image_pixels
        self.max_request_pixels = max_request_pixels

    def decode_all(self, refs: list[tuple[str, str]]) -> list[Image.Image]:
        """[(where, url)] -> images; the pixels of a request's images together are bounded too."""
        out, total = [], 0
        for where, url in refs:
            im = self.decode(url, where, self.max_request_pixels - total)
            total += im.width * im.height
            out.append(im)
        return out

    def decode(self, url: str, where: str, budget: int | None = None) -> Image.Image:
        if url.startswith("data:"):
            return self._open(self._data_url(url, where), where, budget)
        match = SCHEME.match(url)
        scheme = match.group(1).lower() if match else ""
        if scheme in ("http", "https"):
            raise _bad(f"{where}: remote image URLs are not fetched (this server has no network access); "
                       f"send the image as a base64 data URL (data:image/png;base64,...)", where,
                       "unsupported_image_url")
        if scheme not in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
            raise _bad(f"{where}: unsupported URL scheme {scheme!r}; send the image as a base64 data URL "
                       f"(data:image/png;base64,...)", where, "unsupported_image_url")
        if not self.allow_local_files:
            raise _bad(f"{where}: local image files are not served (the server was started without "
                       f"allow_local_files); send the image as a base64 data URL", where,
                       "unsupported_image_url")
        try:
            path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
            if not path.is_file():
                raise _bad(f"{where}: no image file at {path}", where, "image_not_found")
            size = path.stat().st_size
        except (OSError, ValueError) as e:  # a name too long, a NUL byte
            raise _bad(f"{where}: cannot read {str(path)[:200]!r}: {e}", where, "image_not_found") from None
        if size > self.max_bytes:
            raise _bad(f"{where}: the image file has {size} bytes, more than {self.max_bytes}", where,
                       "image_too_large")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise _bad(f"{where}: cannot read {path}: {e}", where, "image_not_found") from None
        return self._open(data, where, budget)

    def _data_url(self, url: str, where: str) -> bytes:
        header, comma, payload = url.partition(",")
        media, *params = header[len("data:"):].split(";")
        if not comma or not media.lower().startswith("image/") or [p.lower() for p in params] != ["base64"]:
            raise _bad(f"{where}: a data URL must be data:image/<type>;base64,<data>, got "
                       f"{header[:60]!r}", where, "invalid_image_url")
        if len(payload) > 4 * -(-self.max_bytes // 3):
            raise _bad(f"{where}: the image has more than {self.max_bytes} bytes", where, "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _bad(f"{where}: the data URL's base64 does not decode: {e}", where,
                       "invalid_base64") from None
        if len(data) > self.max_bytes:
            raise _bad(f"{where}: the image has {len(data)} bytes, more than {self.max_bytes}", where,
                       "image_too_large")
        if not data:
            raise _bad(f"{where}: the data URL holds no image", where, "invalid_image")
        return data

    def _open(self, data: bytes, where: str, budget: int | None) -> Image.Image:
        try:
            with _OPEN_LOCK, warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
            with im:
                w, h = im.size
                if w * h > self.max_pixels:
                    raise _bad(f"{where}: the image is {w}x{h} = {w * h} pixels, more than {self.max_pixels}",
                               where, "image_too_large")
                if budget is not None and w * h > budget:
                    raise _bad(f"{where}: the request's images hold more than {self.max_request_pixels} "
                               f"pixels together", where, "image_too_large")
                im.load()
                return im.convert("RGB")
        except ApiError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bad(f"{where}: refused as a decompression bomb: {e}", where, "image_too_large") from None
        except MemoryError:
            raise _bad(f"{where}: the image is too large to decode", where, "image_too_large") from None
        except Exception as e:  # noqa: BLE001 - whatever PIL raises on a malformed or truncated file
            reason = "not an image in a supported format (PNG, JPEG, WebP, GIF, BMP)" \
                if isinstance(e, Image.UnidentifiedImageError) else f"cannot decode the image: {e}"
            raise _bad(f"{where}: {reason}", where, "invalid_image") from None


# ---------------------------------------------------------------------------------------------- requests
def parse_messages(value) -> tuple[list[dict], list[tuple[str, str]]]:
    """OpenAI messages -> the engine's [{"role", "content": str}] with "<image>" placeholders, and the image
    URLs in reading order as [(field path, url)]."""
    if not isinstance(value, list):
        raise _bad(f"messages must be an array, got {_kind(value)}", "messages")
    if not value:
        raise _bad("messages must not be empty", "messages")
    messages, refs = [], []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        _object(m, where)
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got "
                       f"{role[:50] if isinstance(role, str) else _kind(role)!r}", f"{where}.role")
        if "name" in m and m["name"] is not None:
            _text(m["name"], f"{where}.name")
        content = m.get("content")
        if isinstance(content, str):
            text = _text(content, f"{where}.content")
            _no_placeholder(text, f"{where}.content")
        elif isinstance(content, list):
            text = _parts(content, f"{where}.content", role, refs)
        else:
            raise _bad(f"{where}.content must be a string or an array of parts, got {_kind(content)}",
                       f"{where}.content")
        messages.append({"role": role, "content": text})
    return messages, refs


def _no_placeholder(text: str, where: str) -> None:
    if PLACEHOLDER in text:
        raise _bad(f"{where} contains {PLACEHOLDER!r}, which marks an image in this server's prompts; send "
                   f"images as image_url parts", where)


def _parts(parts: list, where: str, role: str, refs: list) -> str:
    if not parts:
        raise _bad(f"{where} must not be an empty array", where)
    pieces: list[tuple[str, str]] = []
    for j, part in enumerate(parts):
        w = f"{where}[{j}]"
        _object(part, w)
        kind = part.get("type")
        if kind == "text":
            text = _text(part.get("text"), f"{w}.text")
            _no_placeholder(text, f"{w}.text")
            pieces.append(("text", text))
        elif kind == "image_url":
            if role != "user":
                raise _bad(f"{w}: images go in user messages, not {role} ones", w)
            spec = part.get("image_url")
            _object(spec, f"{w}.image_url")
            url = _text(spec.get("url"), f"{w}.image_url.url", empty=False)
            if spec.get("detail") is not None:
                _text(spec["detail"], f"{w}.image_url.detail")
            refs.append((f"{w}.image_url", url))
            pieces.append(("image", PLACEHOLDER))
        else:
            raise _bad(f"{w}.type must be 'text' or 'image_url', got "
                       f"{kind if isinstance(kind, str) else _kind(kind)!r}", f"{w}.type")
    out = ""
    for k, (kind, piece) in enumerate(pieces):
        prev = pieces[k - 1][0] if k else None
        if kind == "text" and prev == "text":
            out += "\n"  # text parts are lines of one message
        elif kind == "text" and prev == "image" and not piece.startswith("\n"):
            out += "\n"  # "<image>\nquestion": an image on its own line, as vlmkit's chat() lays it out
        out += piece
    return out


def parse_chat(body: dict, engine_max_tokens: int | None):
    """A chat request body -> (messages, image refs, GenerationConfig, stream, include_usage)."""
    _object(body)
    if body.get("model") is not None:
        _text(body["model"], "model")
    messages, refs = parse_messages(body.get("messages"))
    for key, ok in UNSUPPORTED.items():
        if body.get(key) is not None and not _safe(ok, body[key]):
            raise _bad(f"{key} is not supported by this server", key, "unsupported_parameter")
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise _bad(f"n must be 1 (one answer per request), got {n}", "n")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    max_tokens = _max_tokens(body, engine_max_tokens or 256)
    stop = _stop(body.get("stop"))
    seed = _integer(body, "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise _bad(f"seed must be in [-2**63, 2**64 - 1], got {seed}", "seed")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"stream must be a boolean, got {_kind(stream)}", "stream")
    include_usage = _include_usage(body.get("stream_options"))
    if body.get("user") is not None:
        _text(body["user"], "user")
    gen = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                           seed=seed)
    return messages, refs, gen, bool(stream), bool(include_usage)


def _max_tokens(body: dict, limit: int) -> int:
    """max_tokens, or its alias max_completion_tokens, in [1, ``limit``] (default: 256 or the limit)."""
    max_tokens = _integer(body, "max_tokens")
    alias = _integer(body, "max_completion_tokens")
    if max_tokens is not None and alias is not None and max_tokens != alias:
        raise _bad(f"max_tokens ({max_tokens}) and max_completion_tokens ({alias}) disagree", "max_tokens")
    key = "max_tokens" if max_tokens is not None else "max_completion_tokens"
    max_tokens = max_tokens if max_tokens is not None else alias
    if max_tokens is None:
        max_tokens = min(256, limit)
    elif max_tokens < 1 or max_tokens > limit:
        raise _bad(f"{key} must be in [1, {limit}] (this server's limit), got {max_tokens}", key)
    return max_tokens


def _stop(stop) -> list[str]:
    """stop: null, a string, or an array of at most MAX_STOP non-empty strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [_text(stop, "stop", empty=False)]
    if isinstance(stop, list):
        if len(stop) > MAX_STOP:
            raise _bad(f"stop holds at most {MAX_STOP} strings, got {len(stop)}", "stop")
        return [_text(s, f"stop[{i}]", empty=False) for i, s in enumerate(stop)]
    raise _bad(f"stop must be a string or an array of strings, got {_kind(stop)}", "stop")


def _include_usage(options) -> bool | None:
    """stream_options.include_usage: False without stream_options, None when they do not say."""
    if options is None:
        return False
    _object(options, "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _bad(f"stream_options.include_usage must be a boolean, got {_kind(include_usage)}",
                   "stream_options.include_usage")
    return include_usage


def _safe(check, value) -> bool:
    try:
        return bool(check(value))
    except Exception:  # noqa: BLE001 - an unhashable or odd value is simply not the default
        return False


def parse_embeddings(body) -> tuple[list[str], str]:
    _object(body)
    if body.get("model") is not None:
        _text(body["model"], "model")
    inp = body.get("input")
    if isinstance(inp, str):
        items = [_text(inp, "input", empty=False)]
    elif isinstance(inp, list):
        if not inp:
            raise _bad("input must not be empty", "input")
        if len(inp) > MAX_EMBED_INPUTS:
            raise _bad(f"input holds at most {MAX_EMBED_INPUTS} items, got {len(inp)}", "input")
        if any(isinstance(x, (int, list)) and not isinstance(x, bool) for x in inp):
            raise _bad("input must be strings (token arrays are not supported)", "input")
        items = [_text(x, f"input[{i}]", empty=False) for i, x in enumerate(inp)]
    else:
        raise _bad(f"input must be a string or an array of strings, got {_kind(inp)}", "input")
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise _bad(f"encoding_format must be 'float' or 'base64', got "
                   f"{fmt if isinstance(fmt, str) else _kind(fmt)!r}", "encoding_format")
    if body.get("dimensions") is not None:
        raise _bad("dimensions is not supported (the model's embedding size is fixed)", "dimensions",
                   "unsupported_parameter")
    if body.get("user") is not None:
        _text(body["user"], "user")
    return items, fmt



MAX_IMAGES_PER_REQUEST = 8
MAX_IMAGE_SIDE = 1024
IMAGE_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


def parse_image_generation(body, native: tuple[int, int]) -> dict:
    """An images request body (OpenAI's ``POST /v1/images/generations``) -> the Pipeline.generate_image arguments
    and the answer's ``size`` (width, height) and format. ``native`` (width, height): the size the model draws at;
    ``size`` is "auto" (that size) or WxH of the same aspect ratio, up to 1024 a side (resized, nearest). vlmkit's
    sampling options (``seed``, ``cfg_scale``, ``temperature``, ``top_k``, ``steps``) ride along as extra fields."""
    _object(body)
    for key in ("model", "user", "quality", "style"):
        if body.get(key) is not None:
            _text(body[key], key)
    prompt = _text(body.get("prompt"), "prompt", empty=False)
    if not prompt.strip():
        raise _bad("prompt must not be blank", "prompt")
    n = _integer(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_IMAGES_PER_REQUEST:
        raise _bad(f"n must be in [1, {MAX_IMAGES_PER_REQUEST}], got {n}", "n")
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise _bad(f"response_format must be 'b64_json' (this server hosts no image URLs), got "
                   f"{fmt if isinstance(fmt, str) else _kind(fmt)!r}", "response_format")
    out_fmt = body.get("output_format") or "png"
    if out_fmt != "png":
        raise _bad(f"output_format must be 'png', got {out_fmt if isinstance(out_fmt, str) else _kind(out_fmt)!r}",
                   "output_format")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise _bad(f"seed must be in [0, 2**63), got {seed}", "seed")
    top_k = _integer(body, "top_k")
    if top_k is not None and top_k < 0:
        raise _bad(f"top_k must be >= 0 (0: every code), got {top_k}", "top_k")
    steps = _integer(body, "steps")
    if steps is not None and not 0 <= steps <= 1000:
        raise _bad(f"steps must be in [0, 1000] (0: the model's default), got {steps}", "steps")
    return {"prompt": prompt, "n": n, "size": _image_size(body.get("size"), native), "seed": seed,
            "cfg_scale": _number(body, "cfg_scale", 5.0, 0.0, 50.0),
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0), "top_k": top_k or 0, "steps": steps or 0}


def _image_size(size, native: tuple[int, int]) -> tuple[int, int]:
    if size is None or size == "auto":
        return native
    match = IMAGE_SIZE.fullmatch(size) if isinstance(size, str) else None
    valid = f"'auto' or WxH with the model's aspect ratio ({native[0]}x{native[1]}), at most {MAX_IMAGE_SIDE} a side"
    if match is None:
        raise _bad(f"size must be {valid}, got {size if isinstance(size, str) else _kind(size)!r}", "size")
    w, h = int(match.group(1)), int(match.group(2))
    if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE) or w * native[1] != h * native[0]:
        raise _bad(f"size must be {valid}, got {size!r}", "size")
    return w, h


def embedding_inputs(items: list[str], listed: bool) -> tuple[list[bool], list[str], list[tuple[str, str]]]:
    """An embedding request's items (``parse_embeddings``) -> (which are images, the texts, the image refs as
    [(field path, url)]). ``listed``: the request's input was an array (the paths are then ``input[i]``)."""
    is_image = [x.startswith("data:image/") for x in items]
    texts = [x for x, im in zip(items, is_image) if not im]
    refs = [(f"input[{i}]" if listed else "input", x) for i, (x, im) in enumerate(zip(items, is_image)) if im]
    return is_image, texts, refs


# ---------------------------------------------------------------------------------------------- the body
async def read_json(request: Request, max_body_bytes: int):
    """The request's body as JSON: more than ``max_body_bytes`` (declared or sent) is a 413, an empty body,
    invalid JSON (NaN and Infinity included) or one nested too deeply a 400."""
    declared = request.headers.get("content-length")
    body = request.stream().__aiter__()
    if declared is not None:
        if not declared.isdigit():
            raise _bad("the Content-Length header is not a number")
        if int(declared) > max_body_bytes:
            await _drain(body, max_body_bytes)
            raise ApiError(413, f"the request body has {declared} bytes, more than this server takes "
                           f"({max_body_bytes})", None, "request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in body:
            size += len(chunk)
            if size > max_body_bytes:
                await _drain(body, max_body_bytes)
                raise ApiError(413, f"the request body is larger than this server takes "
                               f"({max_body_bytes} bytes)", None, "request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _bad("the client disconnected before sending the whole body") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise _bad("the request body is empty; send a JSON object")
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise _bad("the request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise _bad(f"the request body is not valid JSON: {str(e)[:200]}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def _drain(body, limit: int) -> None:
    """Read and drop (up to twice ``limit``) the rest of a refused body, so that a client still sending it
    reads the 413 rather than a reset connection."""
    seen = 0
    try:
        async for chunk in body:
            seen += len(chunk)
            if seen > 2 * limit:
                break
    except Exception:  # noqa: BLE001 - the client went away or the stream was read: nothing left to drain
        pass


__all__ = ["ApiError", "ImageDecoder", "embedding_inputs", "error_body", "parse_chat", "parse_embeddings",
           "parse_image_generation", "parse_messages", "read_json"]
