"""Child process of tests/test_memory_limit.py: a training step under a real memory limit, as the user has it.

``python tests/memlimit_child.py '<json>'`` builds the model and inputs (seeded, as the parent does), runs a
four-sample training step and a matrix product (the libraries' lazy loads and thread pools: not the step's
memory), then sets
``RLIMIT_AS`` to the process's current address space plus ``headroom`` bytes and runs ``what``:

* ``"unoptimized"``: the model's own training step;
* ``"optimize"``: ``fxmemopt.optimize(model, (x,), **kwargs)``, then one training step of the result, saved to
  ``save`` (output, every parameter's gradient, buffers) for the parent to compare bitwise.

Prints one JSON line: what ran, and the error of what did not. The parent sets ``MALLOC_MMAP_THRESHOLD_`` so that
glibc returns freed tensor pages and the limit tracks live bytes (without it, the limit measures fragmentation).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))  # sj_zoo beside this file


def build(cfg: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and inputs of ``cfg`` (the parent builds the same): ``"deepconv"``, ``"sew_resnet18"``, or
    ``"conformance"`` (``builder``, a model function of ``tests/conformance/conformance_cases.py``, called with
    ``args``; its input time-major, ``[T, N, ...]``)."""
    torch.manual_seed(cfg.get("seed", 0))
    if cfg["model"] == "deepconv":
        from fxmemopt.snn.models import DeepConvSNN

        model = DeepConvSNN(num_blocks=cfg["blocks"], channels=cfg["channels"])
        x = (torch.rand(cfg["T"], cfg["N"], 3, cfg["hw"], cfg["hw"]) > 0.5).float()
    elif cfg["model"] == "sew_resnet18":
        from sj_zoo import install_torchvision_stub

        install_torchvision_stub()
        from spikingjelly.activation_based import functional, neuron, surrogate
        from spikingjelly.activation_based.model import sew_resnet

        model = sew_resnet.sew_resnet18(spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(),
                                        detach_reset=True, cnf="ADD", num_classes=10)
        functional.set_step_mode(model, "m")
        x = torch.rand(cfg["T"], cfg["N"], 3, cfg["hw"], cfg["hw"])
    elif cfg["model"] == "conformance":  # a model of the conformance suite, at a size of its own
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "conformance"))
        import conformance_cases

        model, (x,) = getattr(conformance_cases, cfg["builder"])(*cfg["args"])
    else:
        raise ValueError(cfg["model"])
    return model, x


def output(out: object) -> torch.Tensor:
    """The tensor a step's loss sums: the model's output, or its first element (norse returns ``(out, state)``)."""
    return out[0] if isinstance(out, tuple) else out  # type: ignore[return-value]


def reset(model: torch.nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "_memories") and callable(getattr(m, "reset", None)):
            m.reset()


def address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    import fxmemopt

    model, x = build(cfg)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    # warm-up (its BatchNorm statistics put back): the thread pool's threads start, each with its malloc arena (64 MiB
    # of address space): not the step's memory, but RLIMIT_AS counts it
    a = torch.rand(1024, 1024)
    (a @ a).sum()
    del a
    # torch.fx's Interpreter makes a tqdm bar (disabled), whose first instance starts tqdm's monitor thread: 72 MiB
    # of address space (its stack and malloc arena), none of it the step's
    torch.fx.Interpreter(torch.fx.symbolic_trace(torch.nn.Identity())).run(torch.zeros(1))
    # (on four samples of the batch; on all of it for a model that fixes its batch size, ``"whole_warmup"``)
    output(model(x if cfg.get("whole_warmup") else x[:, :4].clone())).sum().backward()
    model.zero_grad(set_to_none=True)
    reset(model)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if b.shape == buffers[n].shape:
                b.copy_(buffers[n])
            else:  # a state buffer the neuron reshapes to its input (snntorch's mem): put back as it was
                path, _, leaf = n.rpartition(".")
                model.get_submodule(path)._buffers[leaf] = buffers[n]
    del buffers
    limit = address_space() + int(cfg["headroom"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out: dict = {"what": cfg["what"]}
    t0 = time.perf_counter()
    try:
        if cfg["what"] == "unoptimized":
            output(model(x)).sum().backward()
            out["step"] = "ok"
        else:
            gm, summary = fxmemopt.optimize(model, (x,), return_summary=True, **cfg.get("kwargs", {}))
            out["optimize_s"] = time.perf_counter() - t0
            out["predicted_peak_after"] = summary.predicted_peak_after
            out["recording"] = summary.recording
            out["regions"] = len(summary.regions)
            out["notes"] = summary.notes
            # measured first (measure_step keeps the gradients a step leaves while it runs its own)
            out["measured_peak_after"] = fxmemopt.measure_step(gm, (x,), repeats=0, warmup=0).peak_bytes
            y = output(gm(x))
            y.sum().backward()
            out["step"] = "ok"
            torch.save({"y": y.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
                        "buffers": dict(model.named_buffers())}, cfg["save"])
    except Exception as e:  # the parent reads what failed
        out["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
