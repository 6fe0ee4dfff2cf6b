"""Which tensors are alive at the peak of one training step, from TensorFlow's own allocator.

    python bench/memory_trace.py [--batch 128] [--runs im2col,native] [--top 12]

Each run is a fresh process (config section [seed], fp32, synthetic data; the conv forms the
autotune cache gives) that traces one step with tf.profiler under TF_CPU_ALLOCATOR_USE_BFC=true:
the BFC allocator records every allocation and free, which the default CPU allocator does not.
Prints per run: the allocator's peak bytes in use, the process's peak RSS (VmHWM), and the
biggest buffers alive at the allocator's peak (op name, shape). Peak RSS minus the allocator's
peak is memory TensorFlow's allocator never saw (runtime, libraries, oneDNN's own buffers).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _stats(plane, event) -> dict:
    names = plane.stat_metadata
    out = {}
    for s in event.stats:
        value = s.str_value or (names[s.ref_value].name if s.ref_value else s.int64_value or s.uint64_value)
        out[names[s.metadata_id].name] = value
    return out


def live_at_peak(space, top: int) -> dict:
    """Replay the allocator's events: its peak in use and the biggest buffers alive then."""
    events = []
    for plane in space.planes:
        kinds = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for ev in line.events:
                kind = kinds.get(ev.metadata_id, "")
                if kind in ("MemoryAllocation", "MemoryDeallocation"):
                    events.append((line.timestamp_ns * 1000 + ev.offset_ps, kind, _stats(plane, ev)))
    if not events:
        raise SystemExit("no allocator events in the trace (is TF_CPU_ALLOCATOR_USE_BFC=true set?)")
    events.sort(key=lambda e: e[0])
    at = max(range(len(events)), key=lambda i: int(events[i][2].get("bytes_allocated", 0)))
    live = {}
    for _, kind, s in events[:at + 1]:
        if kind == "MemoryAllocation":
            live[s.get("addr")] = (int(s.get("requested_bytes", 0)), s.get("tf_op", "?"), s.get("shape", ""))
        else:
            live.pop(s.get("addr"), None)
    by_op = collections.Counter()
    for size, op, shape in live.values():
        by_op[f"{op} {shape}"] += size
    return {"peak_in_use_gib": int(events[at][2].get("bytes_allocated", 0)) / 2**30,
            "top": [(name, size / 2**20) for name, size in by_op.most_common(top)]}


def child(conv_impl: str, batch: int, top: int) -> None:
    import tensorflow as tf

    import utils
    from profile_step import read_xspace
    from train_throughput import hw2_train, peak_rss_gib
    run = hw2_train(utils.load_config("seed"), "fp32", conv_impl, batch)  # traced, one warm-up step
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        run(1)
        tf.profiler.experimental.stop()
        result = live_at_peak(read_xspace(logdir), top)
    result["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--runs", default="im2col,native")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.batch, args.top)
    from train_throughput import machine_line
    print(machine_line(), flush=True)  # names an ONEDNN_MAX_CPU_ISA cap too
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
    for impl in args.runs.split(","):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", impl, "--batch", str(args.batch),
                              "--top", str(args.top)], capture_output=True, text=True, env=env, timeout=900)
        if out.returncode:
            raise SystemExit(f"{impl} failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{impl} fp32 batch {args.batch}: allocator peak {r['peak_in_use_gib']:.2f} GiB, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB")
        for name, mib in r["top"]:
            print(f"  {mib:8.1f} MiB  {name}")


if __name__ == "__main__":
    main()
