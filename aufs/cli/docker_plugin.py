"""`aufs docker-plugin`: serve Docker's graphdriver plugin protocol on this store, so that
`dockerd --experimental --storage-driver NAME` keeps its images and containers here."""

from __future__ import annotations

import argparse
import os
import sys

from aufs.docker.plugin import GraphDriverPlugin, default_socket, init_record_path, serve
from aufs.store.driver import Driver

EXAMPLE = "aufs docker-plugin --name aufs & dockerd --experimental --storage-driver aufs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (f"{parser.description}. The store is --root when given, else the "
                          "Home that dockerd's Init sends (DATA_ROOT/NAME). SIGTERM unmounts "
                          "what the store mounted and removes the socket.")
    parser.add_argument("--name", required=True,
                        help="the plugin's name, which dockerd's --storage-driver gives")
    parser.add_argument("--socket", help="where to listen (default: "
                                         "/run/docker/plugins/NAME.sock, where dockerd looks)")


def explicit_root(arguments: argparse.Namespace) -> str | None:
    """--root (or $AUFS_ROOT) when given; None means: the Home that dockerd's Init sends."""
    if getattr(arguments, "root_given", False) or os.environ.get("AUFS_ROOT"):
        return str(arguments.root)
    return None


def command_docker_plugin(arguments: argparse.Namespace) -> int:
    socket_path = arguments.socket or default_socket(arguments.name)
    root = explicit_root(arguments)
    if root is not None:  # a root that is no store fails now, not at dockerd's first call
        with Driver(root, backend=arguments.backend):
            pass
    plugin = GraphDriverPlugin(root=root, backend=arguments.backend,
                               record_path=init_record_path(socket_path))

    def ready(path: str) -> None:
        where = root or "the Home dockerd sends"
        print(f"aufs: serving graphdriver {arguments.name!r} on {path} for {where}; "
              f"run dockerd --experimental --storage-driver {arguments.name}",
              file=sys.stderr, flush=True)

    serve(plugin, socket_path, ready=ready)
    return 0
