"""Model cards: huggingface_hub's ``ModelCard`` / ``ModelCardData`` parse and write the YAML front matter; loratools
decides what goes in it (its merge policy: its facts replace the same keys, tags are merged, a licence already there
stays) and never touches the prose below it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import FileFormatError
from .selection import CARD

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

#: the tag PEFT writes for an adapter (``base_model:adapter:<id>``); empty after the colon when it knew no base model
ADAPTER_TAG = "base_model:adapter:"


def _parse(text: str, name: str = CARD) -> ModelCard:
    import yaml
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    text = text.removeprefix("\ufeff")
    if not REGEX_YAML_BLOCK.search(text):  # no front matter: an empty one (huggingface_hub would warn of it)
        text = "---\n\n---\n" + text
    try:
        return ModelCard(text)
    except yaml.YAMLError as e:
        raise FileFormatError(f"{name}: its YAML front matter does not parse ({e.__class__.__name__})") from None
    except (ValueError, TypeError) as e:
        if "should be a dict" in str(e):
            raise FileFormatError(f"{name}: its front matter is not a YAML mapping") from None
        raise FileFormatError(f"{name}: its front matter is not a model card's metadata ({str(e)[:120]})") from None


def split(text: str, name: str = CARD) -> tuple[dict[str, Any], str]:
    """A README's front matter (empty when it has none) and its body."""
    card = _parse(text, name)
    return card.data.to_dict(), card.text  # type: ignore[no-untyped-call]


def compose(meta: dict[str, Any], body: str) -> str:
    """A README.md made of ``meta`` as front matter (in that order) and the markdown ``body``."""
    from huggingface_hub import ModelCardData

    return f"---\n{ModelCardData(**meta).to_yaml(original_order=list(meta))}\n---\n\n{body}"


def _fix_adapter_tag(card: ModelCard) -> None:
    """PEFT's ``base_model:adapter:`` tag, written when it knew no base model, completed once the card names one."""
    base, tags = card.data.get("base_model"), card.data.get("tags")
    if isinstance(base, str) and base and isinstance(tags, list) and ADAPTER_TAG in tags:
        card.data["tags"] = [ADAPTER_TAG + base if t == ADAPTER_TAG else t for t in tags]


def updated(text: str, meta: dict[str, Any], name: str = CARD) -> str:
    """``text`` with its front matter updated: loratools' facts replace the same keys, tags are merged, and a license
    already there stays; the body is kept as it is."""
    card = _parse(text, name)
    data = card.data
    for key, value in meta.items():
        if key == "tags":
            tags = data.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            data["tags"] = tags + [t for t in value if t not in tags]
        elif key == "license" and data.get("license"):
            continue
        else:
            data[key] = value
    _fix_adapter_tag(card)
    return str(card)


def filled(text: str, meta: dict[str, Any], name: str = CARD) -> str | None:
    """PEFT's own card template saved with an empty ``base_model`` (``save_pretrained`` of a model it knew no name
    for), with the facts filled in as PEFT's push fills them: the keys that are missing or empty, never one the user
    set, and never the prose. None when ``text`` is not such a card, or there is nothing to fill in."""
    card = _parse(text, name)
    data = card.data
    given = data.to_dict()  # type: ignore[no-untyped-call]
    if "base_model" not in given or data.get("base_model") or not meta.get("base_model"):
        return None
    for key, value in meta.items():
        if key != "tags" and not data.get(key):
            data[key] = value
    _fix_adapter_tag(card)
    return str(card)
