"""Chat messages to a prompt: the model's own chat template, rendered as transformers does.

A checkpoint's template comes from `chat_template.jinja` or the `chat_template` field of
`tokenizer_config.json` (a string, or a list of named templates of which "default" is
used). It is rendered with jinja2 in an immutable sandbox (a template is data from a model
repository, not code we trust), with `trim_blocks`/`lstrip_blocks`, `raise_exception` and
a `tojson` filter, and with `bos_token`/`eos_token` from the tokenizer config.

A model without a template (the embedded `exegpt-tiny-t5`) gets FALLBACK_TEMPLATE:
one line per message, `ROLE: CONTENT`, then `assistant:` for the reply.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with the model's template (a 400 for the client)."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: "<s>" or {"content": "<s>"}."""
    if isinstance(value, dict):
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


def read_chat_template(directory: Path) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none (unreadable: logged)."""
    config: dict[str, Any] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring %s: %s", config_path, exc)
    source: Any = config.get("chat_template")
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        source = jinja_path.read_text(encoding="utf-8")
    if isinstance(source, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        return None
    return ChatTemplate(
        source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    )


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    return environment


def render_chat(
    messages: list[dict[str, Any]],
    template: ChatTemplate | None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages` (each with role and content)."""
    chosen = template or ChatTemplate(FALLBACK_TEMPLATE)
    try:
        compiled = _environment().from_string(chosen.source)
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=chosen.bos_token,
            eos_token=chosen.eos_token,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template failed: {exc}") from None
