"""`aufs import` of a real image into an empty store, against the GNU `gzip -dc | tar -x`
pipeline (layer by layer), `umoci unpack`, and `docker load` / `podman load` where present.

The image is the debootstrap root of benchmarks/layers.py packed by umoci as an OCI layout
with three gzip layers (cached beside the root filesystem)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aufs
from aufs.images import Catalog, import_images
from benchmarks.common import peak_rss_kib, report, report_memory, tmpfs_scratch
from benchmarks.layers import CACHE, root_filesystem

LAYERS = (("usr/share", "documentation, locales and data"), ("var", "package state"),
          ("", "the rest"))


def build_image(source: Path, layout: Path) -> None:
    """Three layers: usr/share, var, then everything else, each made by umoci repack."""
    work = layout.parent / "umoci-work"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:bench"], check=True)
    for index, (part, _) in enumerate(LAYERS):
        bundle = work / f"bundle{index}"
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:bench", str(bundle)],
                       check=True, capture_output=True)
        rootfs = bundle / "rootfs"
        if part:
            (rootfs / part).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(source / part), str(rootfs / part)], check=True)
        else:
            subprocess.run(["cp", "-a", "-n", f"{source}/.", str(rootfs)], check=True)
        subprocess.run(["umoci", "repack", "--image", f"{layout}:bench", str(bundle)],
                       check=True, capture_output=True)
    shutil.rmtree(work)


def layer_blobs(layout: Path) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    (entry,) = [m for m in index["manifests"]
                if m["annotations"]["org.opencontainers.image.ref.name"] == "bench"]
    manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"][7:]).read_text())
    return [layout / "blobs" / "sha256" / layer["digest"][7:] for layer in manifest["layers"]]


def main(arguments: list[str]) -> None:
    if shutil.which("umoci") is None:
        raise SystemExit("umoci is needed to build the image (apt-get install umoci)")
    repeat = int(arguments[0]) if arguments else 5
    with tmpfs_scratch("8g") as scratch:
        source, origin = root_filesystem(scratch)
        layout = CACHE / "oci-bench"
        if not (layout / "index.json").exists():
            shutil.rmtree(layout, ignore_errors=True)
            build_image(source, layout)
        blobs = layer_blobs(layout)
        packed = sum(blob.stat().st_size for blob in blobs)
        print(f"image: {origin}, {len(blobs)} gzip layers, {packed / 1e6:.0f} MB; "
              "targets on tmpfs")
        counter = iter(range(1_000_000))

        def gnu_pipeline() -> None:
            target = scratch / f"run-{next(counter)}"
            target.mkdir()
            for blob in blobs:
                subprocess.run(f"gzip -dc {blob} | tar --numeric-owner -xpf - -C {target}",
                               shell=True, check=True)

        def umoci_unpack() -> None:
            bundle = scratch / f"run-{next(counter)}"
            subprocess.run(["umoci", "unpack", "--image", f"{layout}:bench", str(bundle)],
                           check=True, capture_output=True)

        def ours() -> None:
            driver = aufs.Driver(scratch / f"run-{next(counter)}", backend="overlay")
            import_images(driver, Catalog(driver.store), f"{layout}:bench")

        peers: list[tuple[str, Callable[[], None]]] = [
            ("gzip -dc | tar -x, per layer (peer)", gnu_pipeline),
            ("umoci unpack", umoci_unpack),
            ("aufs import", ours),
        ]
        for tool in ("docker", "podman"):
            if shutil.which(tool) and subprocess.run([tool, "info"], capture_output=True
                                                      ).returncode == 0:
                print(f"{tool} is installed but not measured here: it needs an OCI archive "
                      "loader setup of its own")
        timings: dict[str, list[float]] = {name: [] for name, _ in peers}
        for round_number in range(repeat + 1):
            for name, run in peers:
                start = time.perf_counter()
                run()
                if round_number:
                    timings[name].append(time.perf_counter() - start)
                for path in scratch.glob("run-*"):
                    _remove(path)
        medians = [(name, statistics.median(times), "goal <= 0.5" if name == "aufs import"
                    else "") for name, times in timings.items()]
        report(f"import an image, median of {repeat} (ratio to the GNU pipeline)", medians,
               medians[0][1])
        gnu_target = scratch / "run-memory"
        gnu_target.mkdir()
        gnu = max(peak_rss_kib(f"gzip -dc {blob} | tar --numeric-owner -xpf - -C {gnu_target}",
                               shell=True) for blob in blobs)
        umoci = peak_rss_kib(["umoci", "unpack", "--image", f"{layout}:bench",
                              str(scratch / "run-umoci")])
        import_rss = peak_rss_kib([sys.executable, "-m", "benchmarks.child", "import",
                                   f"{layout}:bench", str(scratch / "run-ours")])
        report_memory("import an image, peak RSS of the child (goal < 100 MiB)", [
            ("gzip -dc | tar -x, largest layer (peer)", gnu, ""),
            ("umoci unpack", umoci, ""),
            ("aufs import", import_rss, ""),
        ])
        for path in scratch.glob("run-*"):
            _remove(path)


def _remove(path: Path) -> None:
    for mount in (path / "mnt").glob("*") if (path / "mnt").is_dir() else []:
        if os.path.ismount(mount):
            aufs.unmount(mount, 2)
    shutil.rmtree(path)
