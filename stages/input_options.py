"""The options naming the inputs a stage reads (``extract`` and ``embed`` read the same sources the same way):
``--no-labels`` and ``--class-names`` as config fields, and a config's inputs resolved into shard units.

No torch or timm: the CLI checks these before a stage's libraries load.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

from apmpipe.storage.errors import ConfigError
from apmpipe.storage.sources import ResolvedInputs, read_class_names, resolve_inputs


def label_options(no_labels: bool, class_names_file: str | None, storage_options: dict[str, Any]) -> dict[str, Any]:
    """``--no-labels`` (no ``label_key``) or ``--class-names FILE`` (read into ``class_names``) as config fields."""
    if no_labels:
        return {"label_key": None}
    return {"class_names": read_class_names(class_names_file, storage_options)} if class_names_file else {}


class ReadsInputs(Protocol):
    """What names a stage's inputs (extract, embed)."""

    inputs: tuple[str, ...]
    folder_block: int
    label_key: str | None
    class_names: tuple[str, ...]
    storage_options: dict[str, Any]


def resolve_config_inputs(config: ReadsInputs) -> ResolvedInputs:
    """The shard units of ``config.inputs`` (no folder classes under ``--no-labels``); refuses options that
    contradict them."""
    inputs = resolve_inputs(config.inputs, folder_block=config.folder_block, storage_options=config.storage_options)
    if config.class_names and inputs.classes:
        raise ConfigError("--class-names is for tar shards; image folders take their classes from sub-folder names")
    return inputs if config.label_key else replace(inputs, classes=())
