"""Tokenizer of a Hugging Face folder (tokenizer.json through `tokenizers`), its chat template,
and incremental detokenization with stop strings."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

# Used when the folder's tokenizer_config.json has no chat_template. Each message becomes
# "<|role|>\n{content}\n" and the prompt ends with "<|assistant|>\n" for the reply.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    pass


class Tokenizer:
    def __init__(self, folder: str | Path, eos_token_id: int | None = None):
        folder = Path(folder)
        self._tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.bos_token = _token_str(cfg.get("bos_token")) or ""
        self.eos_token = _token_str(cfg.get("eos_token")) or ""
        if eos_token_id is None and self.eos_token:
            eos_token_id = self._tok.token_to_id(self.eos_token)
        self.eos_token_id = eos_token_id
        template = cfg.get("chat_template")
        jinja_file = folder / "chat_template.jinja"  # where recent transformers save it
        if template is None and jinja_file.exists():
            template = jinja_file.read_text()
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        self.chat_template: str = template or DEFAULT_CHAT_TEMPLATE
        self._compiled: Any = None
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template renders a `tools` list itself (tool-calling templates do)."""
        return "tools" in self.chat_template

    def apply_chat_template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        if self._compiled is None:
            self._compiled = _compile(self.chat_template)
        from jinja2.exceptions import TemplateError

        try:
            text = self._compiled.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=tools,
            )
        except TemplateError as e:  # e.g. the template's raise_exception("roles must alternate")
            raise ChatTemplateError(f"the model's chat template refused the messages: {e}") from e
        # The template already placed any BOS token.
        return self.encode(text, add_special_tokens=False)


def _compile(template: str) -> Any:
    """The template in the environment Hugging Face templates are written for: a sandbox with
    trim_blocks/lstrip_blocks, loop controls, raise_exception() and a tojson that keeps non-ASCII
    (Qwen's and Llama 3's templates use them)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):  # AddedToken serialised as a dict
        v = v.get("content")
    return v if isinstance(v, str) else None


class Detokenizer:
    """Turns a request's growing token ids into text deltas.

    Decodes a short window of recent tokens (so words that start with a space keep it) and holds
    back text while it ends in an incomplete UTF-8 sequence or in a possible start of a stop
    string, so a stream never shows text the final answer would not contain.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text so far (before stop truncation)
        self.emitted = 0  # chars of self.text already handed out
        self.stopped_by: str | None = None

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the new text that is safe to show."""
        self.ids.extend(token_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        if self.stop:
            for s in self.stop:
                # Search only where a new match can be: the new text and len(s)-1 chars before.
                at = self.text.find(s, max(self.emitted - len(s) + 1, 0))
                if at != -1:
                    self.stopped_by = s
                    self.text = self.text[:at]
                    return self._take(len(self.text))
            return self._take(len(self.text) - self._held_back())
        return self._take(len(self.text))

    def flush(self) -> str:
        """At the end of a request: whatever was held back (for a stop string that never came, or
        an incomplete UTF-8 sequence, which then decodes to U+FFFD as in a whole decode)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._take(len(self.text))

    def _held_back(self) -> int:
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:n]):
                    held = n
                    break
        return held

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
