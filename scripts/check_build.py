"""Says which nat_ext is imported, what torch it was built against and whether its CUDA kernels
are registered; fails when that is not what --cuda expects. With --run and a GPU present it also
solves one small problem on the GPU (catches a build with no machine code for this GPU).
Exit status: 2 when the module does not import or its CUDA kernels are not registered as
--cuda expects (what a rebuild can fix); 1 for a wrong or uncertified 3x3 (a `WRONG ANSWER` line)
and 3 for a hung one (a `HANG` line, the op's NAT_CUDA_TIMEOUT_S deadline): findings about the
kernels, which scripts/gpu_check.sh records before running its later stages with this module.
With --unpack WHEEL it first takes the compiled module (nat_ext/_C*.so) out of a wheel and puts
it beside the tree's Python sources. Used by scripts/check_torch.sh (after a build in a venv)
and scripts/gpu_check.sh (the carried wheel, before falling back to a build from source).

    python scripts/check_build.py --unpack .whl/nat_ext/nat_ext-0.1.0-cp312-cp312-linux_x86_64.whl --cuda 1 --run
"""

import argparse
import os
import re
import sys
import zipfile

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda", choices=["0", "1"], help="whether the CUDA kernels should be registered")
    p.add_argument("--run", action="store_true", help="also solve a 3x3 problem on the GPU, if one is present")
    p.add_argument("--unpack", metavar="WHEEL", help="first put the wheel's nat_ext/_C*.so into ./nat_ext")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="--run's device (cpu: gpu_check.sh --dry-run's stand-in)")
    args = p.parse_args()
    if args.unpack:  # a wheel that cannot be unpacked is one a rebuild replaces: exit 2
        try:
            with zipfile.ZipFile(args.unpack) as z:
                names = [n for n in z.namelist() if n.startswith("nat_ext/_C") and n.endswith(".so")]
                z.extractall(os.getcwd(), names)
        except (OSError, zipfile.BadZipFile) as e:
            print(f"{args.unpack} cannot be unpacked: {type(e).__name__}: {e}", flush=True)
            return 2
        if not names:
            print(f"{args.unpack} holds no nat_ext/_C*.so", flush=True)
            return 2
        print(f"unpacked {', '.join(names)} from {args.unpack}")
    try:
        import nat_ext  # after the unpacking
    except (ImportError, OSError) as e:
        print(f"nat_ext does not import: {type(e).__name__}: {e}", flush=True)
        return 2

    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("nat::linear_sum_assignment", "CUDA")
    print(f"nat_ext from {nat_ext.__file__}, torch {torch.__version__} (CUDA kernels: {cuda})", flush=True)
    if args.cuda is not None and cuda != (args.cuda == "1"):
        print(f"CUDA kernels registered: {cuda}, expected {args.cuda == '1'}", flush=True)
        return 2
    if args.run and (args.device == "cpu" or (cuda and torch.cuda.is_available())):
        return solve_3x3(args.device)
    return 0


def solve_3x3(device: str) -> int:
    """One 3x3 problem on `device`: 0 right, 1 wrong or uncertified, 3 hung (the deadline)."""
    where = torch.cuda.get_device_name() if device == "cuda" else "the CPU"
    stage = os.environ.get("NAT_STAGE", "install")
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    try:
        got = torch.ops.nat.linear_sum_assignment(cost.to(device)).cpu().tolist()
    except RuntimeError as e:  # the op's certificate (NAT_CUDA_FALLBACK=raise) or its deadline
        if re.search(os.environ.get("NAT_HANG_RE") or "did not finish within NAT_CUDA_TIMEOUT_S", str(e)):
            print(f"HANG 3x3 on {where} [{stage}]: {e}", flush=True)
            sys.stdout.flush()
            os._exit(3)  # exiting normally would wait on the hung kernel
        from nat_ext.faults import SolverFaultError
        label = "WRONG ANSWER" if isinstance(e, SolverFaultError) else "FAIL"  # uncertified, or an error
        print(f"{label} [{stage}] 3x3 on {where}: {type(e).__name__}: {e}", flush=True)
        return 1
    if got != [1, 0, 2]:
        print(f"WRONG ANSWER [{stage}] 3x3 on {where}: got {got}, expected [1, 0, 2]", flush=True)
        return 1
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name}: {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB, sm_{props.major}{props.minor}"
    print(f"a 3x3 problem solved on {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
