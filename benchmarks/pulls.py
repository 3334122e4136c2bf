"""`aufs pull` of the debootstrap image from a registry on 127.0.0.1 (Debian's
docker-registry), against `skopeo copy` to an OCI dir followed by `umoci unpack`, in turns."""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aufs
from aufs.images import Catalog
from aufs.images.pull import pull
from benchmarks.common import peak_rss_kib, report, report_memory, tmpfs_scratch
from benchmarks.imports import build_image
from benchmarks.layers import CACHE, root_filesystem


def start_registry(base: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {"version": 0.1, "log": {"level": "error"},
              "storage": {"filesystem": {"rootdirectory": str(base / "data")}},
              "http": {"addr": f"127.0.0.1:{port}"}}
    (base / "config.yml").write_text(json.dumps(config))
    process = subprocess.Popen(["docker-registry", "serve", str(base / "config.yml")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    return process, f"127.0.0.1:{port}"


def main(arguments: list[str]) -> None:
    for tool in ("docker-registry", "skopeo", "umoci"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install docker-registry skopeo umoci)")
    repeat = int(arguments[0]) if arguments else 3
    with tmpfs_scratch("8g") as scratch, tempfile.TemporaryDirectory() as registry_base:
        source, origin = root_filesystem(scratch)
        layout = CACHE / "oci-bench"
        if not (layout / "index.json").exists():
            build_image(source, layout)
        process, registry = start_registry(Path(registry_base))
        try:
            image = f"{registry}/bench/debian:1"
            subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:bench",
                            f"docker://{image}"], check=True, capture_output=True)
            print(f"image: {origin} as 3 gzip layers, pushed to {registry}; targets on tmpfs")
            counter = iter(range(1_000_000))

            def skopeo_umoci() -> None:
                run = scratch / f"run-{next(counter)}"
                run.mkdir()
                subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{image}",
                                f"oci:{run}/layout:bench"], check=True, capture_output=True)
                subprocess.run(["umoci", "unpack", "--image", f"{run}/layout:bench",
                                str(run / "bundle")], check=True, capture_output=True)

            def ours() -> None:
                driver = aufs.Driver(scratch / f"run-{next(counter)}", backend="overlay")
                pull(driver, Catalog(driver.store), image)

            timings: dict[str, list[float]] = {"skopeo copy + umoci unpack (peer)": [],
                                               "aufs pull": []}
            for round_number in range(repeat + 1):
                for name, run in (("skopeo copy + umoci unpack (peer)", skopeo_umoci),
                                  ("aufs pull", ours)):
                    start = time.perf_counter()
                    run()
                    if round_number:
                        timings[name].append(time.perf_counter() - start)
                    for path in scratch.glob("run-*"):
                        shutil.rmtree(path)
            rows = [(name, statistics.median(times), "goal <= 0.25" if name == "aufs pull" else "")
                    for name, times in timings.items()]
            report(f"pull an image from a local registry, median of {repeat}", rows, rows[0][1])
            memory = scratch / "run-memory"
            memory.mkdir()
            skopeo = peak_rss_kib(["skopeo", "copy", "--src-tls-verify=false",
                                   f"docker://{image}", f"oci:{memory}/layout:bench"])
            umoci = peak_rss_kib(["umoci", "unpack", "--image", f"{memory}/layout:bench",
                                  str(memory / "bundle")])
            pulled = peak_rss_kib([sys.executable, "-m", "benchmarks.child", "pull", image,
                                 str(memory / "store")])
            report_memory("pull an image, peak RSS of the child (goal < 100 MiB)", [
                ("skopeo copy (peer)", skopeo, ""), ("umoci unpack (peer)", umoci, ""),
                ("aufs pull", pulled, "")])
            aufs.Driver(memory / "store", backend="overlay").cleanup()
            shutil.rmtree(memory)
        finally:
            process.terminate()
            process.wait()
