"""The server's settings: one frozen object the CLI, the Ray deployment and tests all build the server from."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ServeConfig:
    """What `flowblend serve` keeps warm and how it queues; every field has a flag of the same name.

    The warm shape is (frames, height, width) with the family's defaults for None; requests for other
    sizes are refused unless `dynamic_shapes` (then a new size builds its buffers on first use).
    """

    pair: str = "toy"
    large: str | None = None
    small: str | None = None
    allow_download: bool = False
    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "fp32"
    artifacts: str = "artifacts"
    compile_mode: str | None = None  # torch-compile: torch.compile's mode (flowblend.assembly.EngineChoice)
    compile: str | None = None  # PyTorch engines: none | regional | whole (None: the kind's default)
    attention: str = "auto"  # PyTorch engines: the SDPA kernel (engines/attention.py)
    fp8_keep_blocks: int = 0  # --dtype fp8: first/last N blocks stay BF16
    cfg: str = "batched"  # PyTorch engines: batched | sequential CFG (engines/cfg_modes.py)
    build_engines: bool = False  # compiled backends: build missing engines into the (shared) engine store
    graph: str = "none"  # CUDA graphs: none | whole (cancel takes effect at the end) | per-step
    plan: str | None = None  # default plan of requests without one (None: the family's); warmed at start
    plan_file: str | None = None  # a calibrated plan (JSON) as the default instead
    steps: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    guidance: float | None = None  # default guidance of requests without one (wan22: the high-noise expert's)
    boundary_ratio: float | None = None  # wan22: the expert boundary (None: the family's, 0.875 T2V)
    guidance_2: float | None = None  # wan22: the low-noise expert's CFG scale (None: the family's)
    small_guidance: float | None = None  # the small model's scale (None: that of the model whose step it takes)
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

    def to_dict(self) -> dict:
        return asdict(self)

    def __repr__(self) -> str:  # never print the key
        return f"ServeConfig({', '.join(f'{k}={v!r}' for k, v in asdict(self).items() if k != 'api_key')})"
