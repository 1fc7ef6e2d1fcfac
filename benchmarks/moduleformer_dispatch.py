"""Cost of the ModuleFormer expert layer as the number of experts grows at fixed k, tokens and width.

    python -m benchmarks.moduleformer_dispatch --device auto --tokens 8192 --d-model 512 --hidden 1024 --backward \
        --json moduleformer_dispatch.json

Each ``ExpertLayer`` (E experts, top-k, MLP gate) processes the same ``--tokens`` tokens of width ``--d-model``; every
expert has the same hidden width, so the matmul work per token is the same for every E (k experts per token) and only
the gate's last layer grows with E. The measurements of the different E are interleaved, repeat by repeat, so machine
noise hits all of them alike; each row is the median over ``--repeats`` after ``--warmup`` untimed runs. The summary
is time(E = largest) / time(E = smallest) (ModuleFormer's claim: cost grows with k, not with E; target <= 1.25).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

import torch
from tqdm import tqdm


from benchmarks._output import add_json_argument, write_json
from continual.models.moduleformer.experts import DISPATCH_BACKENDS, ExpertLayer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET = 1.25  # ModuleFormer's claim, as a bound on time(E = largest) / time(E = smallest)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bfloat16 on cuda, else float32")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per forward (batch x sequence)")
    parser.add_argument("--d-model", type=int, default=512, help="model width")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden width of each expert")
    parser.add_argument("--gate-hidden", type=int, default=256, help="MLP gate width (0: linear gate)")
    parser.add_argument("--k", type=int, default=2, help="experts per token")
    parser.add_argument("--experts", default="2,8,16,32,64", help="comma-separated expert counts; first = baseline")
    parser.add_argument("--dispatch", default="auto", choices=DISPATCH_BACKENDS)
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: leave torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    add_json_argument(parser)
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def make_step(layer: ExpertLayer, x: torch.Tensor, backward: bool) -> Callable[[], None]:
    def step() -> None:
        if backward:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).float().square().mean().backward()
        else:
            with torch.no_grad():
                layer(x)

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(e) for e in args.experts.split(",") if e.strip()]
    if not counts or min(counts) < args.k:
        raise SystemExit(f"--experts must list counts >= --k={args.k}, got {args.experts!r}")

    torch.manual_seed(args.seed)
    x = torch.randn(1, args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=args.backward)
    steps: Dict[int, Callable[[], None]] = {}
    layers: Dict[int, ExpertLayer] = {}
    for E in counts:
        layer = ExpertLayer(args.d_model, args.hidden, E, args.k, gate_hidden=args.gate_hidden, dispatch=args.dispatch)
        layers[E] = layer.to(device=device, dtype=dtype)
        layers[E].record_usage = False
        steps[E] = make_step(layers[E], x, args.backward)

    for E in counts:
        for _ in range(args.warmup):
            steps[E]()
    times: Dict[int, List[float]] = {E: [] for E in counts}
    for _ in tqdm(range(args.repeats), desc="repeats", disable=not sys.stderr.isatty()):
        for E in counts:  # interleaved: noise hits every E alike
            times[E].append(timed(steps[E], device))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    what = "forward+backward" if args.backward else "forward"
    print(f"device {name}, torch {torch.__version__}, {dtype}, dispatch {args.dispatch}, {what}")
    print(f"tokens {args.tokens}, d_model {args.d_model}, expert hidden {args.hidden}, gate {args.gate_hidden}, "
          f"k {args.k}, median of {args.repeats} (warm-up {args.warmup})")
    base = statistics.median(times[counts[0]])
    print(f"{'E':>4} {'k':>2} {'median ms':>10} {'ratio':>6} {'busiest expert share':>21}")
    rows = []
    for E in counts:
        median = statistics.median(times[E])
        with torch.no_grad():
            layers[E](x.detach())
        load = torch.bincount(layers[E].last_routing.indices.flatten(), minlength=E).float()
        rows.append({"E": E, "k": args.k, "median_ms": median * 1e3, "ratio": median / base,
                     "busiest_expert_share": float(load.max() / load.sum())})
        print(f"{E:>4} {args.k:>2} {rows[-1]['median_ms']:>10.3f} {rows[-1]['ratio']:>6.2f} "
              f"{rows[-1]['busiest_expert_share']:>21.3f}")
    ratio = statistics.median(times[counts[-1]]) / base
    verdict = "meets" if ratio <= TARGET else "misses"
    print(f"ratio E={counts[-1]} / E={counts[0]} at k={args.k}: {ratio:.3f} ({verdict} the target <= {TARGET})")
    write_json(args.json, args, rows, device=name, dtype=str(dtype), torch=torch.__version__,
               ratio_largest_over_smallest=ratio, target=TARGET, meets_target=ratio <= TARGET)


if __name__ == "__main__":
    main()
