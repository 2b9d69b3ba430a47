"""Text in and text out through a model folder's Hugging Face tokenizer (`moe generate`).

A folder that holds tokenizer.json (a Hugging Face model folder, or our checkpoint converted
from one) encodes and decodes through the `tokenizers` library; a folder without one stays
byte-level (moe/generate.py). The files, all untrusted and all optional but the first:

    tokenizer.json          the tokenizers library's serialisation           <= TOKENIZER_BYTES
    tokenizer_config.json   chat_template; bos / eos / unk / pad tokens       <= files.JSON_BYTES
    chat_template.jinja     the chat template (preferred over tokenizer_config's, as transformers does)
    generation_config.json  eos_token_id, one id or a list: where generation stops
    config.json             eos_token_id, when neither file above names an end token

Each is read through moe.io.files: a regular file that resolves inside the folder (or into the
blobs of a hub cache snapshot), its size capped before a byte is read; a bad one is one
InputError naming it.

A chat template is a Jinja program from the folder. It renders in jinja2's
ImmutableSandboxedEnvironment (no attribute that starts with "_", no mutation of the messages
or of Python objects), with integer powers and repetitions bounded, the rendered text capped at
TEMPLATE_CHARS and, when called from the main thread, the rendering stopped after
TEMPLATE_SECONDS. Whatever the template raises is one InputError naming its file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, excerpt
from ..extras import MissingExtra, require
from . import files

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"
TOKENIZER_BYTES = 64 * 2**20  # the largest published tokenizer.json files are about 35 MB
TEMPLATE_BYTES = 2**20  # published chat templates are a few KB
TEMPLATE_CHARS = 2**20  # the rendered prompt
TEMPLATE_SECONDS = 5.0
MAX_EOS_IDS = 1024
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

__all__ = ["TextTokenizer", "load_tokenizer", "render_chat_template"]


@dataclass(frozen=True)
class TextTokenizer:
    """A folder's tokenizer with what generation needs from the files around it."""

    path: Path  # the tokenizer.json read
    tokenizer: Any = field(repr=False)  # tokenizers.Tokenizer
    eos_ids: tuple[int, ...]  # generation stops at the first of these; () when the folder names none
    chat_template: str | None = field(repr=False)
    template_source: str  # the file (and key) the template came from, for messages
    special_tokens: dict[str, str] = field(repr=False)

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """The prompt's token ids. chat=True renders it as one user message through the chat template,
        whose text already holds the special tokens it wants (so none are added around it)."""
        if chat:
            text = self.render_chat([{"role": "user", "content": text}])
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=not chat).ids)
        except Exception as e:  # the tokenizers library raises plain Exception
            raise InputError(f"{self.path}: cannot encode the prompt: {excerpt(str(e))}") from None

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens left out; ids the tokenizer does not know are skipped."""
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except Exception as e:
            raise InputError(f"{self.path}: cannot decode the output: {excerpt(str(e))}") from None

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self.chat_template is None:
            raise InputError(
                f"--chat needs a chat template: {self.path.parent} has no {TEMPLATE_FILE} and its "
                f"{TOKENIZER_CONFIG_FILE} no 'chat_template'"
            )
        return render_chat_template(self.chat_template, self.template_source, messages, self.special_tokens)

    def until_eos(self, ids: list[int]) -> list[int]:
        """`ids` up to (not including) the first end token."""
        stops = set(self.eos_ids)
        return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


def load_tokenizer(folders: Iterable[str | Path]) -> TextTokenizer | None:
    """The tokenizer of the first folder that holds tokenizer.json; None when none does."""
    for folder in map(Path, folders):
        if os.path.lexists(folder / TOKENIZER_FILE):
            return _load(folder)
    return None


def _load(folder: Path) -> TextTokenizer:
    tokenizers = require("tokenizers", "text prompts through the model folder's tokenizer.json")
    path = files.folder_file(folder, TOKENIZER_FILE, "tokenizer file")
    text = _text(path, files.read_file(path, TOKENIZER_BYTES))
    _json(path, text)  # malformed JSON is named as such, whatever the library's message
    try:
        tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as e:
        raise InputError(f"{path}: not a tokenizer the tokenizers library reads: {excerpt(str(e))}") from None
    config = _optional_json(folder, TOKENIZER_CONFIG_FILE)
    special = _special_tokens(folder / TOKENIZER_CONFIG_FILE, config)
    template, source = _chat_template(folder, config)
    return TextTokenizer(path, tokenizer, _eos_ids(folder, tokenizer, special), template, source, special)


# --------------------------------------------------------------------------- the files around it


def _text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None


def _json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON, truncated or corrupt ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: malformed JSON, nested too deeply") from None


def _optional_json(folder: Path, name: str) -> dict[str, Any]:
    """The JSON object in folder/name, {} when there is no such file."""
    if not os.path.lexists(folder / name):
        return {}
    path = files.folder_file(folder, name, "tokenizer file")
    data = _json(path, _text(path, files.read_file(path, files.JSON_BYTES)))
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _special_tokens(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, ... as strings: each is a string or an AddedToken {"content": ...}."""
    tokens = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            raise InputError(f"{path}: '{key}' = {excerpt(config[key])} is not a token (a string)")
        tokens[key] = value
    return tokens


def _chat_template(folder: Path, config: dict[str, Any]) -> tuple[str | None, str]:
    """(template, where it came from): chat_template.jinja, else tokenizer_config.json's
    "chat_template", a string or a list of {"name", "template"} of which "default" is used."""
    if os.path.lexists(folder / TEMPLATE_FILE):
        path = files.folder_file(folder, TEMPLATE_FILE, "tokenizer file")
        return _text(path, files.read_file(path, TEMPLATE_BYTES)), str(path)
    source = f"{folder / TOKENIZER_CONFIG_FILE} 'chat_template'"
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is None:
        return None, source
    if not isinstance(value, str) or len(value) > TEMPLATE_BYTES:
        raise InputError(f"{source} = {excerpt(value)} is not a template (a string of at most {TEMPLATE_BYTES:,})")
    return value, source


def _eos_ids(folder: Path, tokenizer: Any, special: dict[str, str]) -> tuple[int, ...]:
    """Where generation stops: generation_config.json's eos_token_id, else the id of
    tokenizer_config.json's eos_token, else config.json's eos_token_id; () when none is named."""
    generation = _optional_json(folder, GENERATION_CONFIG_FILE)
    if generation.get("eos_token_id") is not None:
        return _ids(folder / GENERATION_CONFIG_FILE, generation["eos_token_id"])
    if "eos_token" in special and tokenizer.token_to_id(special["eos_token"]) is not None:
        return (tokenizer.token_to_id(special["eos_token"]),)
    model_config = folder / MODEL_CONFIG_FILE
    if os.path.lexists(model_config):
        value = files.read_json(files.folder_file(folder, MODEL_CONFIG_FILE)).get("eos_token_id")
        if value is not None:
            return _ids(model_config, value)
    return ()


def _ids(path: Path, value: object) -> tuple[int, ...]:
    ids = value if isinstance(value, list) else [value]
    if not 0 < len(ids) <= MAX_EOS_IDS or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise InputError(f"{path}: 'eos_token_id' = {excerpt(value)} is not a token id or a list of them")
    return tuple(ids)


# --------------------------------------------------------------------------- chat templates


class _TemplateTimeout(Exception):
    pass


def render_chat_template(
    template: str, source: str, messages: list[dict[str, str]], special_tokens: dict[str, str]
) -> str:
    """The template's text for `messages`, ending with the assistant's turn opened
    (add_generation_prompt), in a sandbox; InputError naming `source` on any failure."""
    environment = _sandbox()
    chunks: list[str] = []
    size = 0
    try:
        with _time_limit(TEMPLATE_SECONDS):
            compiled = environment.from_string(template)
            # tools and documents as transformers passes them when there are none
            variables = dict(messages=messages, add_generation_prompt=True, tools=None, documents=None)
            for chunk in compiled.generate(**variables, **special_tokens):
                size += len(chunk)
                if size > TEMPLATE_CHARS:
                    raise InputError(f"{source}: the chat template renders more than {TEMPLATE_CHARS:,} characters")
                chunks.append(chunk)
    except InputError:
        raise
    except _TemplateTimeout:
        raise InputError(f"{source}: the chat template ran longer than {TEMPLATE_SECONDS:g} s") from None
    except Exception as e:  # the template is a program from the folder: whatever it raises is its failure
        raise InputError(f"{source}: the chat template failed: {type(e).__name__}: {excerpt(str(e))}") from None
    return "".join(chunks)


def _sandbox():
    try:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
    except ImportError as e:  # torch requires jinja2, so this is rare
        raise MissingExtra(
            f"--chat needs jinja2, which is not installed: pip install 'moe-reference[hf]' ({e})"
        ) from None

    class ChatTemplateSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox, where `**` and `*` cannot build numbers or strings of gigabytes
        (the sandbox evaluates constant expressions when it compiles, so this applies there too)."""

        intercepted_binops = frozenset({"**", "*"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and _big_power(left, right):
                raise SecurityError(f"{excerpt(left)} ** {excerpt(right)} is too large")
            if operator == "*" and _big_repeat(left, right):
                raise SecurityError("a repetition longer than the rendered text may be")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: object) -> None:
        raise jinja2.exceptions.TemplateError(str(message))

    def tojson(value: object, indent: int | None = None) -> str:
        if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= 16):
            raise SecurityError(f"tojson indent {excerpt(indent)} is not 0 to 16")
        return json.dumps(value, ensure_ascii=False, indent=indent)

    def strftime_now(fmt: str) -> str:
        return datetime.datetime.now().strftime(fmt)

    environment = ChatTemplateSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return environment


def _big_power(base: object, exponent: object) -> bool:
    if not (isinstance(base, int) and isinstance(exponent, int)) or abs(base) < 2 or exponent < 0:
        return False
    return abs(base).bit_length() * exponent > 4096


def _big_repeat(left: object, right: object) -> bool:
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
            return len(seq) * times > TEMPLATE_CHARS
    return False


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise _TemplateTimeout in the block after `seconds` (SIGALRM): only from the main thread,
    where Python delivers signals, and only where setitimer exists (not Windows)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise _TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
