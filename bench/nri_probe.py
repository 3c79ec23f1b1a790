"""`python -m bench.nri_probe OUT.json -- ARGS...`: run `pysnap ARGS...` (e.g. `serve nri ...`) in this process and,
when it exits, write timings of the NRI plugin's CreateContainer handling to OUT.json, taken from the outside:
  * "wrapper": `ImageVolumePlugin.create_container` (the handler the plugin times itself in its debug log line
    `CreateContainer ID handled in X ms`, plus one Python call): a cross-check of that line;
  * "steps": inside each CreateContainer, every containerd gRPC call the plugin makes (`ContainerdClient._unary`,
    by method name) and the host mount (`mount_snapshot`, run in a worker thread), as {name: [ns, ...]}.
The product code runs unchanged; the wrappers only read the clock around it.
"""

from __future__ import annotations

import contextvars
import json
import sys
import time


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    out, argv = sys.argv[1], sys.argv[3:]

    from nri_bridge import containerd_client, volumes
    from nri_bridge import plugin as nri_plugin
    from pysnap import cli

    wrapper_ns: list[int] = []
    steps: dict[str, list[int]] = {}
    in_create: contextvars.ContextVar[bool] = contextvars.ContextVar("in_create", default=False)

    def note(name: str, ns: int) -> None:
        steps.setdefault(name, []).append(ns)

    cls = nri_plugin.ImageVolumePlugin
    original_create = cls.create_container

    async def create_container(self, request):
        token = in_create.set(True)
        started = time.perf_counter_ns()
        try:
            return await original_create(self, request)
        finally:
            wrapper_ns.append(time.perf_counter_ns() - started)
            in_create.reset(token)

    client_cls = containerd_client.ContainerdClient
    original_unary = client_cls._unary

    async def unary(self, method, *args, **kwargs):
        if not in_create.get():
            return await original_unary(self, method, *args, **kwargs)
        started = time.perf_counter_ns()
        try:
            return await original_unary(self, method, *args, **kwargs)
        finally:
            name = getattr(method, "_method", b"?").decode(errors="replace").rsplit(".", 1)[-1]
            note(f"containerd {name}", time.perf_counter_ns() - started)

    original_mount = volumes.mount_snapshot

    def mount_snapshot(*args, **kwargs):  # runs in a worker thread (asyncio.to_thread)
        started = time.perf_counter_ns()
        try:
            return original_mount(*args, **kwargs)
        finally:
            note("host mount (in its thread)", time.perf_counter_ns() - started)

    cls.create_container = create_container
    client_cls._unary = unary
    volumes.mount_snapshot = mount_snapshot
    try:
        return cli.main(argv)
    finally:
        with open(out, "w") as fh:
            json.dump({"wrapper": wrapper_ns, "steps": steps}, fh)


if __name__ == "__main__":
    sys.exit(main())
