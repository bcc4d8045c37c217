"""Every succeeded job's model, served by the existing serving stack (kubetune.serve).

Adapter runs of one base model share one engine (the base loaded once, each adapter a lane of its
own, as `kubetune serve RUN1 RUN2` does); a full fine-tune is an engine of its own. An engine is
loaded on the first request for one of its models and rebuilt when a new job of its base succeeds;
the one it replaces is closed once no request is in it. Each engine sits behind `serve`'s own
FastAPI app, so chat requests get exactly `kubetune serve`'s behaviour: streaming, tools,
admission (429), errors.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp

from kubetune.control.store import Store
from kubetune.storage.runs import read_run_spec

__all__ = ["ModelHub"]


@dataclass
class _Group:
    names: frozenset[str]
    app: Any            # serve's FastAPI app over the engine


class ModelHub:
    def __init__(self, store: Store, max_concurrency: int = 16, adapters: str = "auto") -> None:
        self.store, self.max_concurrency, self.adapters = store, max_concurrency, adapters
        self._groups: dict[str, _Group] = {}
        self._retired: list[_Group] = []
        self._keys: dict[str, str] = {}       # job id → its group key (the base, or the job for a full model)
        self._lock = threading.Lock()

    def app_for(self, model: str) -> ASGIApp | None:
        """The app serving `model` (a succeeded job's fine_tuned_model), loading it if needed; None if
        no succeeded job has that name. Blocking: call it off the event loop."""
        jobs = {j["fine_tuned_model"]: j for j in self.store.succeeded_models()}
        job = jobs.get(model)
        if job is None:
            return None
        key = self._key(job)
        group = self._groups.get(key)
        if group is not None and model in group.names:
            return group.app
        with self._lock:
            group = self._groups.get(key)
            if group is not None and model in group.names:
                return group.app
            members = [j for j in jobs.values() if self._key(j) == key]
            self._groups[key] = self._load(members)
            if group is not None:
                self._retired.append(group)
            self._close_idle()
            return self._groups[key].app

    def _key(self, job: dict[str, Any]) -> str:
        if job["id"] not in self._keys:
            spec = read_run_spec(job["run_uri"])
            adapter = spec is not None and spec.method.type != "full"
            self._keys[job["id"]] = f"base:{spec.model.base}" if adapter and spec else f"job:{job['id']}"
        return self._keys[job["id"]]

    def _load(self, members: list[dict[str, Any]]) -> _Group:
        from kubetune.serve.app import ServerSettings, create_app
        from kubetune.serve.engine import load_engine

        names = [j["fine_tuned_model"] for j in members]
        engine = load_engine([j["run_uri"] for j in members], with_base=False, max_concurrency=self.max_concurrency,
                             adapters=self.adapters, names=names)
        print(f"engine loaded for {', '.join(names)}: "
              + "; ".join(f"{m.name} {m.weights}" for m in engine.served.values()), flush=True)
        return _Group(frozenset(names), create_app(engine, ServerSettings(max_concurrency=self.max_concurrency)))

    def forget(self, model: str) -> None:
        """A deleted model: the engine serving it is retired (closed once no request is in it); the
        other models of its base load again on their next request."""
        with self._lock:
            for key, group in list(self._groups.items()):
                if model in group.names:
                    del self._groups[key]
                    self._retired.append(group)
            self._close_idle()

    def _close_idle(self) -> None:
        for group in list(self._retired):
            state = group.app.state.kubetune
            if state.admission.admitted == 0:
                state.generation.close()
                self._retired.remove(group)

    def close(self) -> None:
        with self._lock:
            for group in [*self._groups.values(), *self._retired]:
                group.app.state.kubetune.generation.close()
            self._groups.clear()
            self._retired.clear()
