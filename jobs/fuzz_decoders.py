"""Fuzz probe + decode of every format for longer than the suite does (issue #24).

    python jobs/fuzz_decoders.py --minutes 5 [--memory-gib 3] [--case-timeout 10] [--seed 0] [--out fuzz-findings]

Mutates the honest seed files of :func:`medsr_dist.data.hostile.fuzz_seeds` (pydicom's test files of each transfer
syntax, PNG, JPEG, TIFF, the samples' DICOM) with :func:`~medsr_dist.data.hostile.mutate` and runs
``probe_image`` then, when the probe is within 8 M samples (the header limits' stand-in), ``decode_image`` on each
case in a child process under RLIMIT_AS (``--memory-gib``). The parent watches the child: a case that runs longer
than ``--case-timeout`` s (a hang) or kills the child (out of memory, a crash in a codec) is a finding, written to
``--out`` as the mutated file; the child is restarted and fuzzing goes on. Printed at the end: cases run, outcomes
(ok / refused / over the limit) and, for refusals, which exception the codec raised under the project's
ImageDecodeError (the crash classes to turn into specific checks), and the findings. Exit status 1 when any
finding (hang, crash, or an exception that is not ImageDecodeError) was made.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import resource
import select
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_SAMPLES = 8_000_000


def child(seed: int, memory_gib: float) -> None:
    """Run cases for ever: print the case (seed file, ops) before, its outcome after, one JSON line each."""
    limit = int(memory_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import warnings

    from medsr_dist.data.hostile import fuzz_seeds, mutate
    from medsr_dist.io.image import ImageDecodeError, decode_image, probe_image

    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.CRITICAL)
    seeds = fuzz_seeds()
    names = sorted(seeds)
    rng = random.Random(seed)
    while True:
        name = rng.choice(names)
        ops = [(rng.randrange(7), rng.randrange(1 << 24), rng.randrange(1 << 16)) for _ in range(rng.randint(1, 6))]
        print(json.dumps({"case": [name, ops]}), flush=True)
        data = mutate(seeds[name], ops)
        try:
            probe = probe_image(data, "fuzz")
            if probe.pixels * probe.channels > MAX_SAMPLES:
                outcome = "limit"
            else:
                decode_image(data, "fuzz")
                outcome = "ok"
        except ImageDecodeError as exc:
            cause = exc.__cause__
            outcome = "refused" if cause is None else f"refused<{type(cause).__name__}>"
        except Exception as exc:  # noqa: BLE001 - a finding
            outcome = f"ESCAPED {type(exc).__name__}"
        print(json.dumps({"outcome": outcome}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--memory-gib", type=float, default=3.0)
    parser.add_argument("--case-timeout", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="fuzz-findings")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.child:
        child(args.seed, args.memory_gib)
        return
    from medsr_dist.data.hostile import fuzz_seeds, mutate

    seeds = fuzz_seeds()
    out = Path(args.out)
    outcomes: collections.Counter[str] = collections.Counter()
    findings: list[str] = []
    deadline = time.monotonic() + args.minutes * 60
    restart = args.seed

    def record(kind: str, case) -> None:
        name, ops = case
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{kind}-{len(findings):03d}-{name}"
        path.write_bytes(mutate(seeds[name], [tuple(op) for op in ops]))
        findings.append(f"{kind}: {name} {ops} -> {path}")

    while time.monotonic() < deadline:
        proc = subprocess.Popen([sys.executable, __file__, "--child", "--seed", str(restart), "--memory-gib",
                                 str(args.memory_gib)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        restart += 1
        case, started = None, time.monotonic()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if not ready:
                if case is not None and time.monotonic() - started > args.case_timeout:
                    proc.kill()
                    record("hang", case)
                    break
                continue
            line = proc.stdout.readline()
            if not line:  # the child died during a case
                proc.wait()
                if case is not None:
                    record(f"died-rc{proc.returncode}", case)
                break
            message = json.loads(line)
            if "case" in message:
                case, started = message["case"], time.monotonic()
            else:
                outcomes[message["outcome"]] += 1
                if message["outcome"].startswith("ESCAPED"):
                    record("escaped", case)
                case = None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    total = sum(outcomes.values())
    print(f"{total} cases in {args.minutes:g} min; outcomes:")
    for outcome, count in outcomes.most_common():
        print(f"  {count:7d}  {outcome}")
    print(f"{len(findings)} findings" + "".join(f"\n  {f}" for f in findings))
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
