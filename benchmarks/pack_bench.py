"""Micro-benchmark: how fast spikes are packed and unpacked, against the memory-bandwidth floor.

For float32 spike tensors (0/1 values) of each size, times ``try_pack(x, 1)`` and ``unpack(p)`` against
``x.to(torch.bool)`` (one read of the data and a quarter-size write: the floor for anything that looks at every
value) and ``x.clone()`` (what unpacking must at least write). Median of ``--repeats`` interleaved rounds, with
one torch thread and with the default number (oversubscribed threads distort small ops on a shared machine), each
with the input in cache (read just before: a region's input was just written by the layer before it) and evicted
(a 64 MiB write before each timed operation). Below the last-level cache size these differ: ``to(bool)`` reads a
cache-resident 4 MiB tensor in about 0.1 ms, while packing's passes gain less from the cache.

    python benchmarks/pack_bench.py                    # 4 MiB and 64 MiB, 1 thread and default, hot and cold
    python benchmarks/pack_bench.py --sizes 4 --repeats 21 --cache cold

Targets (issue "Speed"): pack at most 4x ``to(bool)``, unpack at most 2x ``clone()``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fxmemopt.runtime.packing import try_pack, unpack


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(mib: int, repeats: int, cache: str = "hot") -> dict[str, float]:
    """Median seconds of each operation on a ``mib`` MiB float32 spike tensor (rounds interleaved).

    ``cache="hot"``: every operation's input is read just before it is timed, so it comes from the CPU's cache when
    it fits (a region's input was just written by the layer before it); ``"cold"``: a 64 MiB buffer is written
    before each timed operation, so the input comes from memory. Below the last-level cache size the ratios
    differ by 2-3x between the two (``to(bool)`` reads a cache-resident 4 MiB tensor in about 0.1 ms).
    """
    torch.manual_seed(0)
    x = (torch.rand(mib * 2**20 // 4) > 0.8).float()
    p = try_pack(x, 1)
    assert p is not None and torch.equal(unpack(p), x)
    flush = torch.empty(64 * 2**20, dtype=torch.uint8)
    ops = {"pack": (lambda: try_pack(x, 1), x), "unpack": (lambda: unpack(p), p.payload),
           "to(bool)": (lambda: x.to(torch.bool), x), "clone": (lambda: x.clone(), x)}
    times: dict[str, list[float]] = {k: [] for k in ops}
    for fn, _ in ops.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, (fn, data) in ops.items():
            if cache == "hot":
                data.sum(dtype=torch.int64) if data.dtype == torch.uint8 else data.sum()
            else:
                flush.fill_(1)
            times[k] += _time(fn, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 64], help="tensor sizes in MiB")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--cache", choices=["hot", "cold", "both"], default="both",
                    help="input read just before each timed operation (hot) or evicted by a 64 MiB write (cold)")
    args = ap.parse_args(argv)
    default_threads = torch.get_num_threads()
    print(f"{'size':>7} {'threads':>7} {'cache':>5} {'pack ms':>8} {'unpack ms':>9} {'to(bool)':>8} {'clone':>7} "
          f"{'pack/to(bool)':>13} {'unpack/clone':>12}")
    ok = True
    for threads in dict.fromkeys((1, default_threads)):
        torch.set_num_threads(threads)
        for mib, cache in ((m, c) for m in args.sizes for c in (("hot", "cold") if args.cache == "both"
                                                                 else (args.cache,))):
            t = measure(mib, args.repeats, cache)
            r_pack, r_unpack = t["pack"] / t["to(bool)"], t["unpack"] / t["clone"]
            ok &= r_pack <= 4 and r_unpack <= 2
            print(f"{mib:>5}Mi {threads:>7} {cache:>5} {t['pack'] * 1e3:8.2f} {t['unpack'] * 1e3:9.2f} "
                  f"{t['to(bool)'] * 1e3:8.2f} {t['clone'] * 1e3:7.2f} {r_pack:13.2f} {r_unpack:12.2f}")
    torch.set_num_threads(default_threads)
    print("targets met (pack <= 4x to(bool), unpack <= 2x clone)" if ok else "targets NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
