"""The worker's HTTP views: ``/health``, ``/metrics`` and ``/users/{id}/score`` (routed to the worker that owns
the user's partition, by Faust's table routing)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import faust
import torch
from faust.web import Request, Response, View

from stream import metrics
from stream.contract import EVENT_TYPES
from stream.engine import Engine
from stream.settings import Settings
from stream.state.user import BANDS, UserState


def items_info(engine: Engine) -> dict[str, Any] | None:
    """/health's ``items``: the item model the engine serves (name, version, sha256 of its arrays), or None."""
    items = engine.items  # one read: a hot swap replaces the attribute, never the model in it
    return None if items is None else items.describe()


def register_views(
    app: faust.App,
    users: Any,
    unwritten_state: Callable[[str], bytes | None],
    engine: Engine,
    settings: Settings,
    device: torch.device,
) -> None:
    """``unwritten_state(user_id)``: the user's newest state not yet in the table's store (written at each commit),
    or None."""

    def ready() -> bool:
        recovery: Any = app.tables.recovery  # type: ignore[attr-defined]  # the stub's TableManagerT lacks it
        return bool(recovery.completed.is_set() and not app.rebalancing)

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return self.json(
                {
                    "status": "ok",
                    # false while rebalancing or restoring tables from their changelogs
                    "ready": ready(),
                    "model": {"name": engine.model.name, "version": engine.model.version},
                    # the item model of the suggestions; null: none, intent events carry null suggestions
                    "items": items_info(engine),
                    "device": str(device),
                    "partitions": sorted(
                        tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_clickstream
                    ),
                }
            )

    @app.page("/metrics")
    class Metrics(View):
        async def get(self, request: Request) -> Response:
            body, content_type = metrics.render()
            return self.bytes(body, content_type=content_type.split(";")[0])

    @app.page("/users/{user_id}/score")
    @app.table_route(table=users, match_info="user_id")
    async def user_score(web: Any, request: Request, user_id: str) -> Response:
        blob = unwritten_state(user_id) or users.get(user_id.encode())
        if blob is None:
            return web.json({"user_id": user_id, "error": "unknown user"}, status=404)
        st = UserState.from_bytes(blob)
        detail = {}
        if request.query.get("window"):
            detail["window"] = {
                "sha256": hashlib.sha256(st.records.tobytes()).hexdigest(),
                "ts": st.records["ts"].tolist(),
                "type": [EVENT_TYPES[t] for t in st.records["type"]],
            }
        return web.json(
            {
                "user_id": user_id,
                "score": None if st.score < 0 else round(st.score, 5),
                "last_emitted_score": None if st.last_score < 0 else round(st.last_score, 5),
                "band": BANDS[st.last_band] if st.last_band >= 0 else None,
                "churn_risk": round(st.churn_risk, 5),
                "events": st.count,
                "window": len(st.records),
                "last_seen": st.last_ts,
                "model_sha256": st.model_tag or None,  # abridged: the model whose hidden state the user holds
                "served_by": settings.advertised_url,
                **detail,
            }
        )
