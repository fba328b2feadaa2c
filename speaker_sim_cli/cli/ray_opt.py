"""``--ray [ADDRESS]``, ``--ray-actors``, ``--ray-gpus-per-actor`` for ``score`` and ``embed``.

Typer has no option whose value is optional, so ``--ray`` is a flag and :class:`RayCommand`
reads a cluster address that follows it (``auto``, ``local``, ``HOST:PORT``,
``ray://HOST:PORT``; also ``--ray=ADDRESS``) into the hidden ``--ray-address``. Anything else
after ``--ray`` stays where it is: ``score --ray trials.csv`` keeps ``trials.csv`` positional.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.core import TyperCommand

if TYPE_CHECKING:
    from ..engine.ray_engine import RayOptions

PANEL = "Cluster (Ray)"
_ADDRESS = re.compile(r"auto|local|(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):\d{1,5}")

RayOpt = Annotated[
    bool,
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="Embed on a Ray cluster (a pool of model actors that hash, decode and embed): "
        "--ray alone uses $RAY_ADDRESS if set, else a local Ray in this process; --ray auto or "
        "--ray HOST:PORT joins a running cluster. --cache-dir must be a path every node sees. "
        "Needs "
        "pip install 'speaker-sim\\[ray]'.",
        rich_help_panel=PANEL,
    ),
]
RayAddressOpt = Annotated[str | None, typer.Option("--ray-address", hidden=True)]
RayActorsOpt = Annotated[
    int,
    typer.Option(
        "--ray-actors",
        min=0,
        help="Model actors (0: one per GPU of the cluster, else its CPUs but one).",
        rich_help_panel=PANEL,
    ),
]
RayGpusOpt = Annotated[
    float | None,
    typer.Option(
        "--ray-gpus-per-actor",
        min=0.0,
        help="GPUs each actor holds (default: 1 when the cluster has GPUs, else 0; 0.5 puts two "
        "actors on a GPU).",
        rich_help_panel=PANEL,
        show_default=False,
    ),
]
RayDecodeOpt = Annotated[
    int,
    typer.Option(
        "--ray-decode-threads",
        min=0,
        help="Threads that hash and decode in each actor, the CPU stage (0: 1 per CPU actor, 4 "
        "per GPU actor, which reserves a CPU for each).",
        rich_help_panel=PANEL,
    ),
]


def split_ray_address(args: list[str]) -> list[str]:
    """``--ray ADDRESS`` / ``--ray=ADDRESS`` -> ``--ray --ray-address ADDRESS``; the rest as is.

    >>> split_ray_address(["t.csv", "--ray", "auto", "-o", "s.csv"])
    ['t.csv', '--ray', '--ray-address', 'auto', '-o', 's.csv']
    >>> split_ray_address(["--ray", "t.csv"])
    ['--ray', 't.csv']
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out.extend(args[i:])
            break
        if a.startswith("--ray="):
            out += ["--ray", "--ray-address", a.split("=", 1)[1]]
        elif a == "--ray" and i + 1 < len(args) and _ADDRESS.fullmatch(args[i + 1]):
            out += ["--ray", "--ray-address", args[i + 1]]
            i += 1
        else:
            out.append(a)
        i += 1
    return out


class RayCommand(TyperCommand):
    """A command whose ``--ray`` may be followed by a cluster address."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, split_ray_address(list(args)))


def ray_options(
    ray: bool,
    address: str | None,
    actors: int,
    gpus_per_actor: float | None,
    device: str,
    decode_threads: int = 0,
) -> RayOptions | None:
    """The checked options, or None without ``--ray``. Raises UsageError (exit 2): a bad
    address, Ray not installed (with how to install it), options that need ``--ray``."""
    from ..errors import UsageError

    if not ray and address is None:
        if actors or gpus_per_actor is not None or decode_threads:
            raise UsageError(
                "--ray-actors, --ray-gpus-per-actor and --ray-decode-threads need --ray"
            )
        return None
    from ..engine.ray_engine import RayOptions

    return RayOptions.from_cli(address, actors, gpus_per_actor, device, decode_threads)
