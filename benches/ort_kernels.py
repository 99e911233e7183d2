#!/usr/bin/env python3
"""ONNX Runtime alone on the shipped model: float (as the file is written) against the int8
kernels ragway's `src/embed/quantize.rs` rewrite uses, in tokens per CPU-second (robust on a
busy machine), idle and peak resident memory, each configuration in its own process and the
two interleaved per shape. Also the session-layout comparison (one session with 2 intra-op
threads, spinning on/off, against 2 single-threaded sessions).

Needs: pip install onnxruntime==1.31.1 onnx numpy   (and scripts/fetch-model.sh)
Run:   python3 benches/ort_kernels.py [--runs-tokens 8192]
"""
import collections, os, subprocess, sys, tempfile, threading, time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL = os.path.join(ROOT, "models/all-MiniLM-L6-v2/model.onnx")


def int8_model(dst):
    """The same rewrite as src/embed/quantize.rs, with the onnx package."""
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(MODEL)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    cons = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)
    remove, new = set(), {}
    for n in g.node:
        if n.op_type != "Cast" or n.input[0] not in inits:
            continue
        (mul,) = cons[n.output[0]]
        scale = [i for i in mul.input if i != n.output[0]][0]
        (use,) = cons[mul.output[0]]
        wq = n.input[0]
        if use.op_type == "MatMul":
            s = inits[scale]
            s.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(s).reshape(-1), scale))
            new[id(use)] = [helper.make_node("DynamicQuantizeMatMul", [use.input[0], wq, scale],
                                             list(use.output), domain="com.microsoft")]
        elif use.op_type == "Gather":
            ids = use.input[1]
            new[id(use)] = [
                helper.make_node("Gather", [wq, ids], [wq + "_r"], axis=0),
                helper.make_node("Gather", [scale, ids], [scale + "_r"], axis=0),
                helper.make_node("Cast", [wq + "_r"], [wq + "_rf"], to=1),
                helper.make_node("Mul", [wq + "_rf", scale + "_r"], list(use.output)),
            ]
        else:
            continue
        remove |= {id(n), id(mul), id(use)}
    out = []
    for n in g.node:
        if id(n) in new:
            out += new[id(n)]
        elif id(n) not in remove:
            out.append(n)
    del g.node[:]
    g.node.extend(out)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(m, dst)


def child(model, sessions, intra, rows, length, tokens, spin):
    import numpy as np
    import onnxruntime as ort

    def status():
        d = dict(l.split(":", 1) for l in open("/proc/self/status"))
        return int(d["VmRSS"].split()[0]) // 1024

    def make():
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        so.intra_op_num_threads = intra
        so.inter_op_num_threads = 1
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    ss = [make() for _ in range(sessions)]
    idle = status()
    ids = np.random.default_rng(1).integers(1000, 29000, size=(rows, length)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    ss[0].run(None, feed)
    runs = max(4, tokens // (rows * length))
    c0 = os.times()
    th = [threading.Thread(target=lambda s=s: [s.run(None, feed) for _ in range(runs // sessions)]) for s in ss]
    [t.start() for t in th]
    [t.join() for t in th]
    c1 = os.times()
    cpu = c1.user - c0.user + c1.system - c0.system
    hwm = int(dict(l.split(":", 1) for l in open("/proc/self/status"))["VmHWM"].split()[0]) // 1024
    print(f"{runs // sessions * sessions * rows * length / cpu:.0f} {idle} {hwm}")


def measure(model, sessions, intra, rows, length, tokens, spin=True):
    out = subprocess.run([sys.executable, __file__, "--child", model, str(sessions), str(intra), str(rows),
                          str(length), str(tokens), "1" if spin else "0"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        child(a[0], *map(int, a[1:6]), a[6] == "1")
        return
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[1] == "--runs-tokens" else 8192
    with tempfile.TemporaryDirectory() as tmp:
        q = os.path.join(tmp, "int8.onnx")
        int8_model(q)
        print("load average:", open("/proc/loadavg").read().strip())
        print("shape      float tok/cpu-s (idle, peak MiB)   int8 tok/cpu-s (idle, peak MiB)")
        for rows, length in [(1, 256), (2, 256), (1, 64), (32, 64), (1, 16), (32, 16)]:
            f = measure(MODEL, 1, 1, rows, length, tokens)
            i = measure(q, 1, 1, rows, length, tokens)
            print(f"{rows:2d} x {length:3d}  {f[0]:>6} ({f[1]}, {f[2]})              {i[0]:>6} ({i[1]}, {i[2]})")
        print("int8, 2 x 256 per run: session layouts")
        for label, args in [("1 session x 2 threads, spinning", (1, 2, True)),
                            ("1 session x 2 threads, no spinning", (1, 2, False)),
                            ("2 sessions x 1 thread", (2, 1, True))]:
            r = measure(q, args[0], args[1], 2, 256, tokens, args[2])
            print(f"  {label:36s} {r[0]:>6} tok/cpu-s, idle {r[1]} MiB, peak {r[2]} MiB")
        print("load average:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main()
