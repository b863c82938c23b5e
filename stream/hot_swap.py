"""The serving models, the scorer and the item model of the suggestions: the newest valid artifact of each at start,
and a newer one swapped in between two batches."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch

from models.artifact import LoadedModel, MissingExportError, list_versions, load_artifact, load_newest
from models.items import ItemModel, load_newest_items, poll_items
from stream import metrics
from stream.engine import Engine
from stream.settings import Settings

log = logging.getLogger("intentstream.worker")
MODEL_POLL_S = 5.0


class NoModelError(RuntimeError):
    pass


def load_model(settings: Settings, device: torch.device) -> LoadedModel:
    model, refused = load_newest(settings.model_dir, device, **_expectations(settings))
    for line in refused:
        log.error("event=model_refused %s", line)
    if model is None:
        raise NoModelError(
            f"no usable model in {settings.model_dir}: train one with "
            f"`intentstream train --data FILE --out {settings.model_dir}` (or run `intentstream demo`)"
        )
    log.info("event=model_runtime version=%s runtime=%s", model.version, model.runtime)
    return model


def _expectations(settings: Settings) -> dict[str, Any]:
    """What an artifact must agree with to be served here, and how to load it."""
    return {
        "expect_window": settings.window_size,
        "expect_session_gap_s": settings.session_gap_s,
        "runtime": settings.runtime,
        "threads": settings.torch_threads,
    }


def announce(model: LoadedModel) -> None:
    metrics.MODEL_VERSION.info({"name": model.name, "version": model.version})


_awaiting_export: set[Path] = set()


async def poll_once(settings: Settings, engine: Engine, device: torch.device, refused: set[Path]) -> None:
    """Swap in the newest valid artifact newer than the one served; a broken one is refused once and logged. One
    that only lacks the serving runtime's export is tried again at every poll: the trainer publishes first and
    `intentstream export` adds the graphs after, and the worker must not give up on it in between."""
    for version, path in list_versions(settings.model_dir):
        if version <= int(engine.model.manifest["version"]) or path in refused:
            return
        try:
            model = await asyncio.to_thread(partial(load_artifact, path, device, **_expectations(settings)))
        except MissingExportError as exc:
            if path not in _awaiting_export:
                _awaiting_export.add(path)
                log.warning("event=model_awaiting_export %s; still serving %s", exc, engine.model.version)
            continue
        except Exception as exc:
            refused.add(path)
            log.error("event=model_refused path=%s reason=%s; still serving %s", path.name, exc, engine.model.version)
            continue
        engine.swap_model(model)
        announce(model)
        log.info("event=model_swapped name=%s version=%s", model.name, model.version)
        return


def announce_items(items: ItemModel | None) -> None:
    """The item model served, in /metrics (/health reads the engine's)."""
    metrics.ITEMS_MODEL.info({"name": "", "version": "none", "sha256": ""} if items is None else items.describe())


def load_items(settings: Settings) -> ItemModel | None:
    """The newest valid item model, or None: the worker runs without one (intent events carry null suggestions)
    rather than refusing to start, since suggestions are an extra and the scores do not depend on them."""
    items, refused = load_newest_items(settings.items_dir)
    for line in refused:
        log.error("event=items_refused %s", line)
    if items is None:
        log.info("event=items_none dir=%s; intent events carry no suggestions until one appears", settings.items_dir)
    else:
        log.info("event=items_loaded version=%s items=%d", items.version, items.n_items)
    announce_items(items)
    return items


async def poll_items_once(settings: Settings, engine: Engine, refused: set[Path]) -> None:
    """Swap in the newest valid item artifact newer than the one served; a broken one is refused once and logged."""
    items, lines = await asyncio.to_thread(poll_items, settings.items_dir, engine.items, refused)
    serving = "none" if engine.items is None else engine.items.version
    for line in lines:
        log.error("event=items_refused %s; still serving %s", line, serving)
    if items is not None:
        engine.swap_items(items)
        announce_items(items)
        log.info("event=items_swapped version=%s items=%d", items.version, items.n_items)
