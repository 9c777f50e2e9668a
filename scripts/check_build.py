"""Says which nat_ext is imported, what torch it was built against and whether its CUDA kernels
are registered; fails when that is not what --cuda expects. With --run and a GPU present it also
solves one small problem on the GPU (catches a build with no machine code for this GPU).
With --unpack WHEEL it first takes the compiled module (nat_ext/_C*.so) out of a wheel and puts
it beside the tree's Python sources. Used by scripts/check_torch.sh (after a build in a venv)
and scripts/gpu_check.sh (the carried wheel, before falling back to a build from source).

    python scripts/check_build.py --unpack .whl/nat_ext/nat_ext-0.1.0-cp312-cp312-linux_x86_64.whl --cuda 1 --run
"""

import argparse
import os
import zipfile

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cuda", choices=["0", "1"], help="whether the CUDA kernels should be registered")
    p.add_argument("--run", action="store_true", help="also solve a 3x3 problem on the GPU, if one is present")
    p.add_argument("--unpack", metavar="WHEEL", help="first put the wheel's nat_ext/_C*.so into ./nat_ext")
    args = p.parse_args()
    if args.unpack:
        with zipfile.ZipFile(args.unpack) as z:
            names = [n for n in z.namelist() if n.startswith("nat_ext/_C") and n.endswith(".so")]
            if not names:
                raise SystemExit(f"{args.unpack} holds no nat_ext/_C*.so")
            z.extractall(os.getcwd(), names)
        print(f"unpacked {', '.join(names)} from {args.unpack}")
    import nat_ext  # after the unpacking

    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("nat::linear_sum_assignment", "CUDA")
    print(f"nat_ext from {nat_ext.__file__}, torch {torch.__version__} (CUDA kernels: {cuda})", flush=True)
    if args.cuda is not None and cuda != (args.cuda == "1"):
        raise SystemExit(f"CUDA kernels registered: {cuda}, expected {args.cuda == '1'}")
    if args.run and cuda and torch.cuda.is_available():
        cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
        got = torch.ops.nat.linear_sum_assignment(cost.cuda()).cpu().tolist()
        if got != [1, 0, 2]:
            raise SystemExit(f"a 3x3 problem on {torch.cuda.get_device_name()}: got {got}, expected [1, 0, 2]")
        props = torch.cuda.get_device_properties(0)
        print(f"a 3x3 problem solved on {props.name}: {props.multi_processor_count} SMs, "
              f"L2 {props.L2_cache_size >> 20} MiB, sm_{props.major}{props.minor}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
