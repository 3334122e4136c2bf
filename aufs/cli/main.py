"""The `aufs` command line: a thin layer over the library. Errors are one line and exit 1,
usage errors exit 2, and tracebacks appear only with --debug."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, NamedTuple

from aufs import _implementation as native
from aufs import machine
from aufs.cli.progress import Progress
from aufs.cli.sizes import human_size
from aufs.errors import AufsError, NotSupportedError
from aufs.images import inflaters
from aufs.images.digests import HashingReader, buffered
from aufs.store.backends import BACKENDS
from aufs.store.driver import Driver

log = logging.getLogger("aufs")


class CommandError(AufsError):
    """A command that cannot do what was asked; the message says what to do."""


class UsageError(CommandError):
    """Options that do not go together: exit status 2, as argparse's own usage errors."""


class LayerListing(NamedTuple):
    id: str
    parent: str
    size: int | None  # None when the content is missing
    mounted: bool
    tags: tuple[str, ...]
    broken: str = ""  # why the layer cannot be used, or ""


def default_root() -> str:
    if os.environ.get("AUFS_ROOT"):
        return os.environ["AUFS_ROOT"]
    if os.geteuid() == 0:
        return "/var/lib/aufs"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "aufs")


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def _open_driver(arguments: argparse.Namespace) -> Driver:
    return Driver(arguments.root, backend=arguments.backend)


def _catalog(driver: Driver) -> Any:
    from aufs.images import Catalog

    return Catalog(driver.store)


@contextlib.contextmanager
def _progress(label: str, layers: int | None = None) -> Iterator[Progress]:
    progress = Progress(label, layers)
    try:
        yield progress
    finally:
        progress.done()


def _resolve_layer(driver: Driver, reference: str) -> str:
    return str(_catalog(driver).resolve(reference)[0])


def _resolve_parent(driver: Driver, reference: str | None) -> str:
    return _resolve_layer(driver, reference) if reference else ""


# ---- commands ---------------------------------------------------------------------------------


def command_info(arguments: argparse.Namespace) -> int:
    backends = []
    for name, backend_class in BACKENDS.items():
        try:
            backend_class().check_machine()
            backends.append({"name": name, "usable": True, "why": ""})
        except NotSupportedError as error:
            backends.append({"name": name, "usable": False, "why": error.reason or str(error)})
    reports = machine.describe()
    inflater = inflaters.GZIP_INFLATER
    if arguments.json:
        _print_json({"implementation": native.IMPLEMENTATION, "backends": backends,
                     "inflater": {"name": inflater.name, "version": inflater.version},
                     "machine": [report.__dict__ for report in reports]})
        return 0
    print(f"implementation: {native.IMPLEMENTATION}")
    hint = "" if inflater.name == "isal" else " (pip install 'aufs[fast]' for ISA-L's)"
    print(f"gzip inflater: {inflater.name} {inflater.version}{hint}")
    print("backends:")
    for backend in backends:
        state = "usable" if backend["usable"] else f"not usable: {backend['why']}"
        print(f"  {backend['name']:<15} {state}")
    print("machine:")
    for report in reports:
        print(f"  {'yes' if report.present else 'no ':<4} {report.name:<20} {report.detail}")
    return 0


def command_ls(arguments: argparse.Namespace) -> int:
    driver = _open_driver(arguments)
    tags_by_layer: dict[str, list[str]] = {}
    for tag in _catalog(driver).tags().values():
        tags_by_layer.setdefault(tag.top, []).append(tag.name)
    layers = []
    children: dict[str, list[str]] = {}
    for layer in driver.layer_ids():
        broken = ""
        try:
            parents = driver.parent_ids(layer)
        except AufsError:
            parents, broken = [], "unreadable layers file"
        try:
            size: int | None = native.directory_size(driver.store.diff_path(layer))
        except FileNotFoundError:
            size, broken = None, "content missing"
        parent = parents[0] if parents else ""
        children.setdefault(parent, []).append(layer)
        layers.append(LayerListing(layer, parent, size, driver.is_mounted(layer),
                                   tuple(sorted(tags_by_layer.get(layer, []))), broken))
    if arguments.json:
        _print_json([layer._asdict() for layer in layers])
        return 0
    by_id = {layer.id: layer for layer in layers}

    def show(layer_id: str, depth: int) -> None:
        layer = by_id[layer_id]
        marks = " mounted" if layer.mounted else ""
        if layer.broken:
            marks += f" broken ({layer.broken}; see aufs fsck)"
        tags = f" [{', '.join(layer.tags)}]" if layer.tags else ""
        size = "-" if layer.size is None else human_size(layer.size)
        print(f"{'  ' * depth}{layer_id[:16]}  {size:>9}{marks}{tags}")
        for child in sorted(children.get(layer_id, [])):
            show(child, depth + 1)

    for parent in sorted(children):  # "" first; then chains whose parent is gone
        if parent not in by_id:
            if parent:
                print(f"(missing layer {parent[:16]}; see aufs fsck)")
            for base in sorted(children[parent]):
                show(base, 1 if parent else 0)
    if not layers:
        print(f"no layers in {driver.root}; add some with `aufs import`")
    return 0


def command_import(arguments: argparse.Namespace) -> int:
    from aufs.images import import_images

    driver = _open_driver(arguments)
    with _progress("import") as progress:
        images = import_images(driver, _catalog(driver), arguments.source, arguments.tag,
                               progress)
    if arguments.json:
        _print_json([image.__dict__ for image in images])
        return 0
    for image in images:
        shared = len(image.layers) - len(image.created)
        print(f"{image.name or image.top[:12]}: {len(image.layers)} layers "
              f"({len(image.created)} new, {shared} shared), top {image.top[:12]}")
    return 0


def command_export(arguments: argparse.Namespace) -> int:
    from aufs.images import export_image

    driver = _open_driver(arguments)
    with _progress("export") as progress:
        result = export_image(driver, _catalog(driver), arguments.ref, arguments.output,
                              arguments.format, progress)
    if arguments.json:
        _print_json(result.__dict__)
    else:
        print(f"wrote {result.destination} ({result.format}, config {result.config_digest[:19]})")
    return 0


def command_mount(arguments: argparse.Namespace) -> int:
    driver = _open_driver(arguments)
    path = driver.get(_resolve_layer(driver, arguments.ref))
    _print_json({"path": path}) if arguments.json else print(path)
    return 0


def command_umount(arguments: argparse.Namespace) -> int:
    driver = _open_driver(arguments)
    layer = _resolve_layer(driver, arguments.ref)
    if not driver.parent_ids(layer):
        print(f"{arguments.ref} is a base layer: it is never mounted", file=sys.stderr)
        return 0
    driver.put(layer)
    if arguments.json:
        _print_json({"unmounted": driver.store.mount_path(layer)})
    return 0


@contextlib.contextmanager
def _output(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdout.buffer
        return
    if os.path.isdir(path):
        raise CommandError(f"{path} is a directory; give a file name, or - for stdout")
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "wb") as handle:  # a device or a pipe: write into it, never replace it
            yield handle
        return
    temporary = path + ".partial"
    try:
        with open(temporary, "wb") as handle:
            yield handle
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def command_diff(arguments: argparse.Namespace) -> int:
    driver = _open_driver(arguments)
    layer = _resolve_layer(driver, arguments.layer)
    parent = _resolve_parent(driver, arguments.parent)
    with _progress("diff", 1) as progress, driver.diff(layer, parent) as stream, \
            _output(arguments.output) as out:
        while chunk := stream.read(1 << 20):
            out.write(chunk)
            progress("bytes", len(chunk))
        progress("layer", 1)
    return 0


def command_apply(arguments: argparse.Namespace) -> int:
    driver = _open_driver(arguments)
    parent = _resolve_parent(driver, arguments.parent)
    if not driver.exists(arguments.layer):
        driver.create(arguments.layer, parent)
    source = sys.stdin.buffer if arguments.file == "-" else open(arguments.file, "rb")  # noqa: SIM115
    try:
        with _progress("apply", 1) as progress:
            counted = buffered(HashingReader(source, lambda count: progress("bytes", count)))
            size = driver.apply_diff(arguments.layer, parent, counted)
            progress("layer", 1)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    if arguments.json:
        _print_json({"layer": arguments.layer, "size": size})
    else:
        print(human_size(size))
    return 0


def command_changes(arguments: argparse.Namespace) -> int:
    driver = _open_driver(arguments)
    changes = driver.changes(_resolve_layer(driver, arguments.layer),
                             _resolve_parent(driver, arguments.parent))
    if arguments.json:
        _print_json([{"path": c.path, "kind": str(c.kind)} for c in changes])
    else:
        for change in changes:
            print(change)
    return 0


def command_du(arguments: argparse.Namespace) -> int:
    target = arguments.target
    if os.path.exists(target):
        size = native.directory_size(target)
    else:
        driver = _open_driver(arguments)
        layer = _resolve_layer(driver, target)
        parents = driver.parent_ids(layer)
        size = driver.diff_size(layer, parents[0] if parents else "")  # the layer's own
    if arguments.json:
        _print_json({"target": target, "size": size})
    else:
        print(human_size(size))
    return 0


def command_rm(arguments: argparse.Namespace) -> int:
    driver = _open_driver(arguments)
    catalog = _catalog(driver)
    tags = catalog.tags()
    removed: list[str] = []
    if arguments.target in tags:
        top = tags[arguments.target].top
        catalog.remove_tag(arguments.target)
        still_tagged = {t.top for t in catalog.tags().values()}
        kept = {p for t in still_tagged for p in [t, *driver.parent_ids(t)]}
        for layer in [top, *driver.parent_ids(top)]:
            if layer in kept or driver.store.children(layer):
                break
            driver.remove(layer, force=arguments.force)
            removed.append(layer)
    else:
        driver.remove(arguments.target, force=arguments.force)
        removed.append(arguments.target)
    if arguments.json:
        _print_json({"removed": removed})
    else:
        for layer in removed:
            print(f"removed {layer}")
    return 0


def command_migrate(arguments: argparse.Namespace) -> int:
    from aufs.store.layout import Store
    from aufs.store.migrate import migrate

    with _progress("migrate") as progress:
        result = migrate(Store(os.path.abspath(arguments.root)), arguments.to, progress)
    if arguments.json:
        _print_json(result.__dict__)
    else:
        print(f"{len(result.converted)} layers converted to {result.target} whiteouts"
              + (f", {len(result.already_done)} were done before" if result.already_done else ""))
    return 0


def command_rescue(arguments: argparse.Namespace) -> int:
    from aufs.docker.rescue import rescue

    with _progress("rescue") as progress:
        images = rescue(arguments.docker_root, arguments.output, progress)
    if arguments.json:
        _print_json([image.__dict__ for image in images])
        return 0
    for image in images:
        state = "byte for byte" if image.exact else "rebuilt: " + "; ".join(image.notes)
        print(f"{image.tag}: {image.image_id[:19]} ({state})")
    print(f"wrote {arguments.output}: try `skopeo inspect oci:{arguments.output}:latest`")
    return 0


def command_fsck(arguments: argparse.Namespace) -> int:
    from aufs.images import fsck

    if arguments.force and not arguments.repair:
        raise UsageError("--force goes with --repair: aufs fsck --repair --force")
    root = os.path.abspath(arguments.root)
    if not os.path.isdir(os.path.join(root, "layers")):
        raise CommandError(f"{root} is no layer store (it has no layers/ dir); give the "
                           "store with --root or AUFS_ROOT")
    if arguments.repair:
        repaired, remaining = fsck.repair(root, force=arguments.force)
    else:
        repaired, remaining = [], fsck.check(root)
    removed_layers = [p.subject for p in repaired if p.code == "removed-layer"]
    removed_tags = [p.subject for p in repaired if p.code == "dangling-tag"]
    if arguments.json:
        _print_json({"repaired": [p.__dict__ for p in repaired],
                     "problems": [p.__dict__ for p in remaining],
                     "removed_layers": removed_layers, "removed_tags": removed_tags})
    else:
        for problem in repaired:
            if problem.code == "removed-layer":
                print(f"removed layer {problem.subject} ({problem.message})")
            elif problem.code == "dangling-tag":
                print(f"removed tag {problem.subject} ({problem.message})")
            else:
                print(f"repaired {problem.code}: {problem.path}")
        for problem in remaining:
            print(problem)
        if not remaining:
            print(f"{root}: clean")
    return 1 if remaining else 0


def _credentials(arguments: argparse.Namespace, registry: str) -> Any:
    from aufs.images.registry import Credentials, docker_config_credentials

    password = arguments.password
    if arguments.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    if arguments.username:
        if password is None:
            raise CommandError("--username needs --password or --password-stdin")
        return Credentials(arguments.username, password)
    return docker_config_credentials(registry)


def command_pull(arguments: argparse.Namespace) -> int:
    from aufs.images.pull import pull
    from aufs.images.registry import Reference

    reference = Reference.parse(arguments.reference)
    driver = _open_driver(arguments)
    with _progress("pull") as progress:
        image = pull(driver, _catalog(driver), arguments.reference, arguments.tag,
                     platform=arguments.platform,
                     credentials=_credentials(arguments, reference.registry),
                     insecure=arguments.insecure, jobs=arguments.jobs, progress=progress)
    if arguments.json:
        _print_json(image.__dict__)
    else:
        print(f"{image.name}: {len(image.layers)} layers ({len(image.created)} fetched), "
              f"top {image.top[:12]}")
    return 0


def command_push(arguments: argparse.Namespace) -> int:
    from aufs.images.push import push
    from aufs.images.registry import Reference

    reference = Reference.parse(arguments.destination)
    driver = _open_driver(arguments)
    with _progress("push") as progress:
        result = push(driver, _catalog(driver), arguments.ref, arguments.destination,
                      credentials=_credentials(arguments, reference.registry),
                      insecure=arguments.insecure, compression=arguments.compression,
                      chunk_size=arguments.chunk_size, progress=progress)
    if arguments.json:
        _print_json(result.__dict__)
    else:
        print(f"pushed {result.reference} ({result.manifest_digest[:19]}): "
              f"{len(result.uploaded)} uploaded, {len(result.skipped)} already there, "
              f"{len(result.mounted)} mounted from another repository")
    return 0


def command_docker_plugin(arguments: argparse.Namespace) -> int:
    from aufs.cli.docker_plugin import command_docker_plugin

    return command_docker_plugin(arguments)


def command_demo(arguments: argparse.Namespace) -> int:
    from aufs.cli.demo import run_demo

    return run_demo(arguments.backend)


# ---- the parser -------------------------------------------------------------------------------

COMMANDS: list[tuple[str, Callable[[argparse.Namespace], int], str, str]] = [
    ("info", command_info, "what this machine supports", "aufs info --json"),
    ("ls", command_ls, "the layers as a tree, with sizes, mounts and tags", "aufs ls"),
    ("import", command_import, "import an OCI layout (dir or tar) or a docker save archive",
     "aufs import ./image.tar --tag myapp   or   aufs import ./oci-dir:latest"),
    ("export", command_export, "write a tag or top layer as an image",
     "aufs export myapp -o myapp-oci   (or -o myapp.tar --format docker-archive)"),
    ("mount", command_mount, "mount a tag or layer and print its path", "aufs mount myapp"),
    ("umount", command_umount, "unmount what `aufs mount` mounted", "aufs umount myapp"),
    ("diff", command_diff, "write a layer's changes as a tar", "aufs diff LAYER -o layer.tar"),
    ("apply", command_apply, "apply a tar to a layer (made if missing)",
     "aufs apply LAYER --parent BASE layer.tar"),
    ("changes", command_changes, "list a layer's changes as A/C/D lines",
     "aufs changes LAYER --parent BASE"),
    ("du", command_du, "apparent size of a path, or of a layer's changes", "aufs du /some/dir"),
    ("rm", command_rm, "remove a layer, or a tag and the layers only it used",
     "aufs rm myapp"),
    ("migrate", command_migrate, "convert the store's whiteout format in place (resumable)",
     "aufs migrate --to overlay"),
    ("rescue", command_rescue, "export the images of a Docker aufs data root as OCI",
     "aufs rescue /var/lib/docker -o rescued-oci"),
    ("pull", command_pull, "pull an image from a registry into the store",
     "aufs pull registry.example.com/team/app:1.2 --tag app"),
    ("push", command_push, "push a tag or top layer to a registry",
     "aufs push app registry.example.com/team/app:1.2"),
    ("fsck", command_fsck, "check the store's invariants; --repair fixes what is safe, "
     "--repair --force also removes broken layers", "aufs fsck --repair"),
    ("docker-plugin", command_docker_plugin, "serve Docker's graphdriver plugin protocol",
     "aufs docker-plugin --name aufs & dockerd --experimental --storage-driver aufs"),
    ("demo", command_demo, "import the sample image, mount, change, export, clean up",
     "aufs demo"),
]


class _RootOption(argparse.Action):
    """Stores --root and notes that it was given (docker-plugin otherwise uses Docker's)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        namespace.root = values
        namespace.root_given = True


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. Only the top parser has
    defaults: a subparser's default would overwrite a value given before the command."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=default(default_root()), action=_RootOption,
                        help="the store (default: $AUFS_ROOT, /var/lib/aufs as root, else "
                             "~/.local/share/aufs)")
    common.add_argument("--backend", default=default("auto"), choices=["auto", *BACKENDS],
                        help="union-mount backend (default: auto)")
    common.add_argument("--json", action="store_true", default=default(False),
                        help="print JSON for scripts")
    common.add_argument("--debug", action="store_true", default=default(False),
                        help="show tracebacks and debug logs")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(defaults=False)
    parser = argparse.ArgumentParser(prog="aufs", parents=[_common_options(defaults=True)],
                                     description="Docker's AUFS layer store on today's kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, handler, summary, example in COMMANDS:
        sub = commands.add_parser(name, parents=[common], help=summary, description=summary,
                                  epilog=f"example: {example}")
        sub.set_defaults(handler=handler)
        parsers[name] = sub
    parsers["import"].add_argument("source", help="PATH or PATH:REF")
    parsers["import"].add_argument("--tag", help="tag the imported image")
    parsers["export"].add_argument("ref", help="a tag or a top layer id")
    parsers["export"].add_argument("-o", "--output", required=True,
                                   help="destination dir (oci), or .tar")
    parsers["export"].add_argument("--format", default="oci", choices=["oci", "docker-archive"])
    for name in ("mount", "umount"):
        parsers[name].add_argument("ref", help="a tag or a layer id")
    for name in ("diff", "apply", "changes"):
        parsers[name].add_argument("layer")
        parsers[name].add_argument("--parent", help="the parent to compare with")
    parsers["diff"].add_argument("-o", "--output", required=True, help="a file, or - for stdout")
    parsers["apply"].add_argument("file", help="an uncompressed tar, or - for stdin")
    parsers["du"].add_argument("target", help="a path, or a layer or tag")
    parsers["rm"].add_argument("target", help="a layer id or a tag")
    parsers["rm"].add_argument("--force", action="store_true",
                               help="detach busy mounts lazily instead of failing")
    parsers["migrate"].add_argument("--to", required=True, choices=["overlay", "aufs"])
    for name in ("pull", "push"):
        parsers[name].add_argument("--username", help="registry user (else ~/.docker/config.json)")
        parsers[name].add_argument("--password", help="registry password")
        parsers[name].add_argument("--password-stdin", action="store_true",
                                   help="read the password from stdin")
        parsers[name].add_argument("--insecure", action="store_true",
                                   help="plain HTTP (localhost registries use it anyway)")
    parsers["pull"].add_argument("reference", help="REGISTRY/REPOSITORY:TAG or ...@sha256:...")
    parsers["pull"].add_argument("--tag", help="the local tag (default: the reference)")
    parsers["pull"].add_argument("--platform", help="OS/ARCH[/VARIANT] from an index")
    parsers["pull"].add_argument("--jobs", type=int, default=3, help="parallel downloads")
    parsers["push"].add_argument("ref", help="a local tag or top layer")
    parsers["push"].add_argument("destination", help="REGISTRY/REPOSITORY:TAG")
    parsers["push"].add_argument("--compression", default="gzip", choices=["gzip", "zstd"])
    parsers["push"].add_argument("--chunk-size", type=int, default=0,
                                 help="upload in chunks of this many bytes (0: whole)")
    parsers["fsck"].add_argument("--repair", action="store_true",
                                 help="repair what can be repaired without losing data")
    parsers["fsck"].add_argument("--force", action="store_true",
                                 help="with --repair: also remove each broken layer, every "
                                      "layer built on it and their tags (skipping any that "
                                      "is mounted or held)")
    from aufs.cli.docker_plugin import add_arguments as docker_plugin_arguments

    docker_plugin_arguments(parsers["docker-plugin"])
    parsers["rescue"].add_argument("docker_root", help="e.g. /var/lib/docker")
    parsers["rescue"].add_argument("-o", "--output", required=True, help="the OCI layout to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if arguments.debug else logging.WARNING,
                        format="aufs: %(levelname)s: %(message)s")
    try:
        _check_output(getattr(arguments, "output", None))
        return int(arguments.handler(arguments))
    except KeyboardInterrupt:
        print("aufs: interrupted", file=sys.stderr)
        return 130
    except UsageError as error:
        print(f"aufs {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # one line, whatever it is; --debug shows the traceback
        if arguments.debug:
            raise
        print(f"aufs: error: {_one_line(error)}", file=sys.stderr)
        return 1


def _check_output(path: str | None) -> None:
    """-o names something we can write: said before any work, in words, not as the errno of
    a temporary file."""
    if path is None or path == "-":
        return
    if not path:
        raise UsageError("-o needs a path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CommandError(f"cannot write {path}: {parent} is not a directory")


def _one_line(error: BaseException) -> str:
    text = " ".join((str(error) or type(error).__name__).split())
    if isinstance(error, PermissionError) and os.geteuid() != 0:
        return f"{text} (mounting and most store changes need root)"
    if isinstance(error, (AufsError, OSError, ValueError)):
        return text
    if isinstance(error, (zlib.error, EOFError)) or type(error).__name__ == "ZstdError":
        return f"corrupt compressed data ({text}): the image is damaged; fetch it again"
    return (f"internal error: {type(error).__name__}: {text} (run again with --debug for "
            "the traceback, and report it)")


if __name__ == "__main__":
    sys.exit(main())
