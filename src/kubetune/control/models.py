"""Every succeeded job's model, served by the existing serving stack (kubetune.serve).

Adapter runs of one base model share one engine: the base is loaded once, each adapter a lane of its
own. The engine of a base is loaded on the first request for one of its models; a model of that
base asked for later is added to the running engine (`add_adapter`: no reload, the other models keep
answering), and a deleted one is removed from it. At most `max_loras` adapters of a base are loaded
at once: the least recently used goes (it loads again on its next request). A full fine-tune is an
engine of its own. Each engine sits behind `serve`'s own FastAPI app, so chat requests get exactly
`kubetune serve`'s behaviour: streaming, tools, admission (429), errors.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp

from kubetune.runs.layout import serves_merged
from kubetune.control.records import Records
from kubetune.runs.run import read_run_spec

__all__ = ["ModelHub"]


@dataclass
class _Group:
    names: set[str]
    app: Any                                  # serve's FastAPI app over the engine
    used: dict[str, float] = field(default_factory=dict)   # name → when last asked for

    @property
    def engine(self) -> Any:
        return self.app.state.kubetune.engine


class ModelHub:
    def __init__(self, records: Records, max_concurrency: int = 16, adapters: str = "auto", max_loras: int = 8) -> None:
        self.records, self.max_concurrency, self.adapters = records, max_concurrency, adapters
        self.max_loras = max_loras
        self._groups: dict[str, _Group] = {}
        self._retired: list[_Group] = []
        self._keys: dict[str, str] = {}       # job id → its group key (the base, or the job for a full model)
        self._lock = threading.Lock()

    def app_for(self, model: str) -> ASGIApp | None:
        """The app serving `model` (a succeeded job's fine_tuned_model), loading it if needed; None if
        no succeeded job has that name. Blocking: call it off the event loop."""
        job = next((j for j in self.records.succeeded_models() if j["fine_tuned_model"] == model), None)
        if job is None:
            return None
        key = self._key(job)
        group = self._groups.get(key)
        if group is not None and model in group.names:
            group.used[model] = time.monotonic()
            return group.app
        with self._lock:
            group = self._groups.get(key)
            if group is None or model not in group.names:
                group = self._added(key, group, job)
            group.used[model] = time.monotonic()
            return group.app

    def _added(self, key: str, group: _Group | None, job: dict[str, Any]) -> _Group:
        model = job["fine_tuned_model"]
        if group is not None and group.engine.growable:
            started = time.monotonic()
            added = group.engine.add_adapter(job["run_uri"], model)
            group.names.add(model)
            print(f"adapter added to the running engine of {key}: {model} {added.weights} "
                  f"({time.monotonic() - started:.1f} s)", flush=True)
            self._evict(group, keep=model)
            return group
        self._groups[key] = self._load(job)
        if group is not None:
            self._retired.append(group)
        self._close_idle()
        return self._groups[key]

    def _evict(self, group: _Group, keep: str) -> None:
        """Beyond max_loras adapters, the least recently asked for goes (it loads again when asked)."""
        while len(group.names) > self.max_loras:
            oldest = min((n for n in group.names if n != keep), key=lambda n: group.used.get(n, 0.0))
            group.engine.remove(oldest)
            group.names.discard(oldest)
            group.used.pop(oldest, None)
            print(f"adapter unloaded (max_loras {self.max_loras}): {oldest}", flush=True)

    def _key(self, job: dict[str, Any]) -> str:
        if job["id"] not in self._keys:
            spec = read_run_spec(job["run_uri"])
            adapter = spec is not None and not serves_merged(spec)
            self._keys[job["id"]] = f"base:{spec.model.base}" if adapter and spec else f"job:{job['id']}"
        return self._keys[job["id"]]

    def _load(self, job: dict[str, Any]) -> _Group:
        from kubetune.serve.app import ServerSettings, create_app
        from kubetune.serve.engine import load_engine

        name = job["fine_tuned_model"]
        engine = load_engine([job["run_uri"]], with_base=False, max_concurrency=self.max_concurrency,
                             adapters=self.adapters, names=[name], growable=True)
        print(f"engine loaded for {name}: " + "; ".join(f"{m.name} {m.weights}" for m in engine.served.values()),
              flush=True)
        return _Group({name}, create_app(engine, ServerSettings(max_concurrency=self.max_concurrency)))

    def forget(self, model: str) -> None:
        """A deleted model stops being served: removed from its running engine (the base's other
        adapters keep answering), or its engine retired (closed once no request is in it)."""
        with self._lock:
            for key, group in list(self._groups.items()):
                if model not in group.names:
                    continue
                if group.engine.growable and len(group.names) > 1:
                    group.engine.remove(model)
                    group.names.discard(model)
                    group.used.pop(model, None)
                else:
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
