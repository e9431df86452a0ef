"""The server's settings: one frozen object the CLI, the Ray deployment and tests all build the server from."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from flowblend.errors import FlowblendError
from flowblend.settings import split_settings

from ..assembly.choice import EngineChoice
from ..resolve.blend_request import BlendChoices


@dataclass(frozen=True)
class ServeConfig:
    """What `flowblend serve` keeps warm and how it queues; every field has a flag of the same name.

    The engine and blend settings are not declared here: `engine` is an `EngineChoice` and `blend` a
    `BlendChoices`, whose fields are the flags (cli/common.py) and the keys a config file may give, flat
    (`steps: 4`) or nested (`blend: {steps: 4}`), through `from_settings`. The warm shape is (frames, height, width) with the family's defaults for None; requests for other
    sizes are refused unless `dynamic_shapes` (then a new size builds its buffers on first use).
    """

    pair: str = "toy"
    large: str | None = None
    small: str | None = None
    allow_download: bool = False
    engine: EngineChoice = field(default_factory=EngineChoice)  # the engine options (assembly/choice.py)
    build_engines: bool = False  # compiled backends: build missing engines into the (shared) engine store
    graph: str = "none"  # CUDA graphs: none | whole (cancel takes effect at the end) | per-step
    # the defaults of requests that leave a value out (None: the family's); the plan is warmed at start
    blend: BlendChoices = field(default_factory=BlendChoices)
    dynamic_shapes: bool = False
    plans_dir: str | None = None  # calibrated plans by name: <plans_dir>/<name>.json
    results_dir: str = "results"
    queue_size: int = 8  # queued jobs beyond the running one; more get 429
    max_steps: int = 200
    drain_seconds: float = 60.0  # SIGTERM: how long the running job may take to finish
    retry_after_seconds: int = 5
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    # access (serve/guard.py): the address served decides the Host names allowed and whether a key is required
    host: str = "127.0.0.1"
    api_key: str | None = None  # required as "Authorization: Bearer KEY" when set; must be set off loopback
    allowed_hosts: tuple[str, ...] = ()  # Host names beyond loopback and the bound address ("*": any)
    api_docs: bool = False  # /docs and /openapi.json
    max_body_bytes: int = 1 << 20  # a request is a prompt and a few values: larger bodies get 413 unread
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers (then 408, closed)
    body_timeout: float = 30.0  # seconds a request's body may take to arrive in all (then 408, closed)

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> "ServeConfig":
        """From a config file's or `serve run`'s keys: ServeConfig's own fields, and every EngineChoice and
        BlendChoices field flat or under `engine` / `blend`; an unknown key is refused in one line naming the
        known ones."""
        rest, nested = split_settings(values, {"engine": EngineChoice, "blend": BlendChoices})
        own = {f for f in cls.__dataclass_fields__ if f not in ("engine", "blend")}
        unknown = sorted(set(rest) - own)
        if unknown:
            raise FlowblendError(f"unknown setting(s) {unknown}: use ServeConfig's ({', '.join(sorted(own))}) or "
                                 f"an engine or blend setting ({', '.join(sorted(set().union(*map(_names, nested))))})")
        return cls(**rest, engine=EngineChoice(**nested["engine"]), blend=BlendChoices(**nested["blend"]))

    def to_dict(self) -> dict:
        """Nested: `engine` and `blend` are dicts of their settings (`from_settings` reads it back)."""
        return asdict(self)

    def __repr__(self) -> str:  # never print the key
        return f"ServeConfig({', '.join(f'{k}={v!r}' for k, v in asdict(self).items() if k != 'api_key')})"


def _names(section: str) -> tuple[str, ...]:
    from dataclasses import fields

    return tuple(f.name for f in fields({"engine": EngineChoice, "blend": BlendChoices}[section]))
