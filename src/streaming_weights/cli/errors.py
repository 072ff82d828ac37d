"""The one place that turns an exception reaching the CLI into a one-line message and an exit status."""

from __future__ import annotations

import errno
import re

from ..exceptions import StreamingWeightsError

# The library's words for an option -> the CLI flag a user types (the message then says what to pass).
_API_TO_FLAG = {
    "model_name": "--model", "token": "--token", "websocket_uri": "--server", "cache_size": "--cache-size",
    "prefetch_count": "--prefetch", "cache_policy": "--policy", "ca_cert": "--ca-cert", "chunks_dir": "--chunks-dir",
    "output_dir": "--output-dir", "max_new_tokens": "--max-new-tokens",
}


def cli_words(message: str) -> str:
    """Replace the Python API's keyword names in a library message with the CLI's flags."""
    message = re.sub(r"\b\w+=\S* \(CLI: (--[\w-]+)\)", r"\1", message)  # "ca_cert= (CLI: --ca-cert)"
    message = re.sub(r",? or force=True,?", "", message)  # "use --force, or force=True, to replace it"
    message = message.replace("force=True", "--force")
    for api, flag in _API_TO_FLAG.items():
        message = re.sub(rf"\b{api}=(?=[^\s,.;)])", flag + " ", message)  # model_name='x' -> --model 'x'
        message = re.sub(rf"\b{api}=", flag, message)  # "pass token= or ..." -> "pass --token or ..."
    return message.strip()


def _os_error(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if exc.errno == errno.EPIPE:
        return "broken pipe"
    return exc.strerror or str(exc)


def describe(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) for an exception that reached ``main``.

    Library errors (the streaming_weights tree) exit 2 with their message in CLI words; anything else is a
    bug or an environment problem and exits 1, named by its type so it can be reported.
    """
    if isinstance(exc, StreamingWeightsError):
        text = str(exc) or type(exc).__name__
        return cli_words(" ".join(text.split())), 2
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return f"{_os_error(exc)}{where}", 1
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__, 1
