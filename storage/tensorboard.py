"""TensorBoard event files beside ``metrics.jsonl``: the same scalars, written by torch's ``SummaryWriter``.

Optional: needs the ``tensorboard`` package (``pip install tensorboard`` or apmpipe's ``tensorboard`` extra).
Events go to ``RUN/tensorboard`` for a local run. TensorBoard's own file layer reaches object stores only with
credentials from the environment (it takes no ``--storage-option``), so a remote run writes its events to a local
``--tensorboard-dir``. Tags group the losses: ``loss/total``, ``loss/level_<layer>``, ``loss/rgb``,
``loss/logits``; the other keys (``lr``, ``epoch``, ``samples_per_s``, ``data_wait_s``) keep their names.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .checkpoint import RunDir
from .errors import ConfigError
from .redact import redact_url


def events_folder(run: RunDir, given: str | None) -> str:
    """Where the event files of ``run`` go: ``given`` (a local folder) or ``RUN/tensorboard`` for a local run."""
    if given is not None and "://" in given:
        raise ConfigError(
            f"--tensorboard-dir {redact_url(given)} must be a local folder (TensorBoard's writer cannot take "
            "--storage-option); give a local one and copy it where you like"
        )
    if given is None and not run.local:
        raise ConfigError(
            f"--tensorboard cannot write into the remote run {redact_url(run.url)} (TensorBoard's writer cannot "
            "take --storage-option); add --tensorboard-dir LOCAL_FOLDER"
        )
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard")
    return given or f"{run.root}/tensorboard"


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a ``metrics.jsonl`` key (losses grouped under ``loss/``)."""
    if key == "loss":
        return "loss/total"
    return key.replace("loss_", "loss/", 1) if key.startswith("loss_") else key


class ScalarWriter:
    """Every number of each metrics record as a scalar at the record's step."""

    def __init__(self, folder: str, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step, the first step this run logs: a resumed run hides what a killed one logged after its checkpoint
        self._writer = SummaryWriter(folder, purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(scalar_tag(key), value, record["step"])

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
