"""``fastface app`` on a large store: first page, a click on a front point → its gallery, Compare, peak RSS.

Builds the store of benchmarks/bench_storage_scale.py (``--scale`` of the paper's 1,451,520
examples and ~10 M metric rows; or reuses ``--root``), starts ``fastface app`` on it as its
own process, and times HTTP requests as a browser makes them (the page's HTML; images are
one file read each and not included):

- start: the process started until it serves (imports, the store opened, the first run's fronts);
- first page: ``/explore``, the first request;
- again: the same page (fronts cached per run and filter);
- a front point clicked → its gallery page (a config's first 12 images with their metrics);
- gallery page 50 (OFFSET paging); the Compare tab;
- peak RSS of the app's process (``VmHWM``);
- the app process's CPU seconds per request (user + system over DuckDB's threads): on a shared
  machine the wall times carry other people's load, the CPU seconds do not.

    python benchmarks/bench_app.py --scale 0.1
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CPU_SECONDS: list[float] = []  # the app process's CPU seconds per fetch (user + system), in order


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fetch(url: str, pid: int) -> tuple[float, str]:
    """Wall seconds of one request, and its body; the app's CPU seconds for it go to CPU_SECONDS."""
    cpu = cpu_seconds(pid)
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        body = response.read().decode()
    CPU_SECONDS.append(cpu_seconds(pid) - cpu)
    return time.perf_counter() - started, body


def peak_rss_gib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return kb / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--root", default=None, help="an existing store (default: build one in a temp folder)")
    args = parser.parse_args()
    root, built = args.root, False
    if root is None or not os.path.exists(os.path.join(root, "catalog.sqlite")):
        from bench_storage_scale import PAPER_EXAMPLES, bulk_load
        from storage import Store

        root = root or tempfile.mkdtemp(prefix="fastface-bench-app-")
        built = args.root is None
        n = int(PAPER_EXAMPLES * args.scale)
        print(f"building {n:,} examples in {root}", flush=True)
        store = Store(root)
        state = bulk_load(store, n, log=lambda line: None)
        store.compact()
        store.close()
        print(f"bulk load {state['load_s']:.0f} s", flush=True)
    env = dict(os.environ, PYTHONPATH=REPO)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fastface.cli", "app", "--root", root, "--port", "0"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"(http://[^/\s]+)", line).group(1)
        ready = time.perf_counter() - started  # the process started, the store opened, the first fronts prepared
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        first, page = fetch(url + "/explore", proc.pid)
        again, _ = fetch(url + "/explore", proc.pid)
        point = re.search(r"<a href='(/explore\?[^']*cpreset[^']*)'>", page).group(1).replace("&amp;", "&")
        click, gallery = fetch(url + point, proc.pid)
        assert "gallery-cards" in gallery, gallery[-2000:]
        paged, _ = fetch(url + point.split("#")[0] + "&page=50", proc.pid)
        compare, _ = fetch(url + "/compare", proc.pid)
        rss = peak_rss_gib(proc.pid)
        points = page.count("class='front-point")
        print(f"app start → serving {ready:.1f} s; first page {first:.2f} s ({points} front points), "
              f"again {again:.3f} s, click → gallery {click:.3f} s, gallery page 50 {paged:.3f} s, "
              f"compare {compare:.3f} s, app peak RSS {rss:.2f} GiB")
        print("app CPU seconds (user + system, DuckDB's threads summed) per request: first page {:.2f}, again {:.2f}, "
              "click {:.2f}, page 50 {:.2f}, compare {:.2f}".format(*CPU_SECONDS))
        print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in
                                     {"first page < 2 s": first < 2, "click → gallery < 1 s": click < 1,
                                      "process < 2 GiB": rss < 2}.items()))
    finally:
        proc.terminate()
        proc.wait()
        if built:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
