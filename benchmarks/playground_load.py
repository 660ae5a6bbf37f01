"""Playground under load: several pages stepping at once against one `mnist-world play` server, as the page
does it (a WebSocket each: restart, then "step" and wait for the frame, again and again, with the arrows
changing every few frames).

    python benchmarks/playground_load.py --checkpoint models/best.pt [--clients 8] [--seconds 60]
        [--cpus 0,1] [--tokens data/tokens.zarr --frames data/frames.zarr --actions data/actions.zarr]
        [--params params.yaml] [--threads 1] [--workers N] [--stagger S]

The server runs pinned to --cpus (taskset) with its defaults (one torch thread, one dreaming worker per CPU,
the params' sampler); each client steps as fast as its frames come (a page at full speed), so the figures
are the server's capacity (the clients run on the same machine, sharing its CPUs). Reports per client the
frames per second, and over all frames the p50 / p95 / max latency (from sending "step" to receiving the
frame), the errors (any error message or dropped connection), and the server's resident memory before the
clients, at its peak, and after they have gone (their sessions ended); first, the machine it ran on (the
figures follow its speed). The pages open all at once, so, stepping in step, they all slide their contexts
(every 10 frames) in the same round: the worst case. With --stagger S they open S seconds apart, as pages
opened one after another do, and slide in different rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
import websockets.asyncio.client

from mnist_world.core.devices import describe_machine

STEPS = [[0.11, 0.0], [0.0, 0.11], [-0.11, 0.0], [0.0, -0.11], [0.0, 0.0]]  # the arrows, 5 frames each


def resident_mib(pid: int) -> float:
    """The process's resident memory (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def client(
    url: str,
    sequence: int,
    temperature: float,
    deadline: float,
    latencies: list[float],
    errors: list[str],
    delay: float = 0.0,
) -> int:
    """One page opened `delay` seconds from now, stepping until `deadline` at the server's default
    temperature: the frames it received."""
    frames = 0
    await asyncio.sleep(delay)
    try:
        async with websockets.asyncio.client.connect(url, max_size=2**22) as socket:
            await socket.send(json.dumps({"op": "restart", "sequence": sequence}))
            while (message := json.loads(await socket.recv()))["type"] != "start":
                if message["type"] == "error":
                    errors.append(message["error"])
                    return 0
            while time.perf_counter() < deadline:
                action = STEPS[(frames // 5) % len(STEPS)]
                controls = {"op": "controls", "action": action, "temperature": temperature}
                await socket.send(json.dumps(controls))
                started = time.perf_counter()
                await socket.send(json.dumps({"op": "step"}))
                while (message := json.loads(await socket.recv()))["type"] not in ("frame", "error"):
                    pass
                if message["type"] == "error":
                    errors.append(message["error"])
                    continue
                latencies.append(time.perf_counter() - started)
                frames += 1
    except (OSError, websockets.exceptions.WebSocketException) as error:
        errors.append(f"connection: {error!r}")
    return frames


async def load(
    url: str, clients: int, seconds: float, config: dict, stagger: float = 0.0
) -> tuple[list[int], list[float], list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    first, temperature = config["sequences"][0], config["temperature"]
    counts = await asyncio.gather(
        *(
            client(url, first + index, temperature, deadline, latencies, errors, index * stagger)
            for index in range(clients)
        )
    )
    return list(counts), latencies, errors


def main(
    checkpoint: Annotated[Path, typer.Option(help="The checkpoint served.")] = Path("models/best.pt"),
    tokens: Path = Path("data/tokens.zarr"),
    frames: Path = Path("data/frames.zarr"),
    actions: Path = Path("data/actions.zarr"),
    params: Path = Path("params.yaml"),
    clients: Annotated[int, typer.Option(min=1)] = 8,
    seconds: Annotated[float, typer.Option(min=1)] = 60.0,
    cpus: Annotated[
        str, typer.Option(help="CPUs the server is pinned to (taskset -c); '' for none.")
    ] = "0,1",
    threads: Annotated[int, typer.Option(min=1, help="The server's torch threads (its --threads).")] = 1,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="The server's dreaming workers (its --workers; unset: its default)."),
    ] = None,
    stagger: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds between one page's opening and the next's (0: all at once, so that every page's "
            "context slides in the same round).",
        ),
    ] = 0.0,
) -> None:
    script = Path(sys.executable).with_name("mnist-world")
    command = [str(script), "play", f"--checkpoint={checkpoint}", f"--tokens={tokens}", f"--frames={frames}"]
    command += [f"--actions={actions}", f"--params={params}", "--port=0", f"--threads={threads}"]
    command += [] if workers is None else [f"--workers={workers}"]
    if cpus and shutil.which("taskset"):
        command = ["taskset", "-c", cpus, *command]  # taskset execs the server: the same process id
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("mnist-world playground on "):
            raise SystemExit(f"the server did not start: {line!r}")
        base = line.split()[3].rstrip("/")
        with urllib.request.urlopen(base + "/api/config", timeout=60) as response:
            config = json.loads(response.read())
        url = base.replace("http://", "ws://") + "/api/live"
        # Warm up: load the checkpoint and the stores once, so "before" is a server ready to play.
        asyncio.run(load(url, 1, 2.0, config))
        before = resident_mib(server.pid)
        peak = [before]
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.5):
                peak.append(resident_mib(server.pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        loads = [os.getloadavg()[0]]
        started = time.perf_counter()
        counts, latencies, errors = asyncio.run(load(url, clients, seconds, config, stagger))
        elapsed = time.perf_counter() - started
        loads.append(os.getloadavg()[0])
        stop.set()
        watcher.join()
        time.sleep(1.0)  # the sessions end as their connections close
        after = resident_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)

    rates = [count / elapsed for count in counts]
    ordered = np.sort(latencies)
    where = f"one server on CPUs {cpus or 'any'} with {threads} torch thread{'s' * (threads > 1)}"
    where += "" if workers is None else f" and {workers} worker{'s' * (workers > 1)}"
    machine = describe_machine(torch.device("cpu"))
    bf16 = "native" if machine["cpu_native_bf16"] else "emulated"
    print(f"machine: {machine['processor']}, {machine['cores']} cores, bf16 {bf16}, torch {machine['torch']}")
    opened = "all at once" if stagger == 0 else f"opened {stagger:g} s apart"
    print(f"{clients} clients ({opened}), {elapsed:.0f} s, {where}, {config['steps']} steps")
    print(f"load average: {loads[0]:.1f} before, {loads[1]:.1f} after (the machine's, all its CPUs)")
    mean = statistics.mean(rates)
    print(f"frames/s per client: mean {mean:.2f}, min {min(rates):.2f}, max {max(rates):.2f}")
    print(f"frames in all: {len(latencies)} ({sum(rates):.1f} frames/s)")
    if latencies:
        p50, p95 = np.percentile(ordered, [50, 95])
        print(f"latency per frame: p50 {p50:.3f} s, p95 {p95:.3f} s, max {ordered[-1]:.3f} s")
    print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print(f"server memory (RSS): before {before:.0f} MiB, peak {max(peak):.0f} MiB, after {after:.0f} MiB")


if __name__ == "__main__":
    typer.run(main)
