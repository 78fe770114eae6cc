"""Small run of the three CUDA kernels for compute-sanitizer (memcheck, racecheck).

Usage: compute-sanitizer --tool memcheck python bench/sanitize_kernels.py
"""

import torch

from lplb import CUBE_8P2E, Planner, torus_2d

N_LOGICAL = 256


def main() -> None:
    cuda = torch.device("cuda")
    gen = torch.Generator(device=cuda).manual_seed(0)
    for r2o, ep, k in ((CUBE_8P2E, 32, 2), (torus_2d(8, 4), 32, 4)):
        planner = Planner(r2o, N_LOGICAL + k * ep, N_LOGICAL, ep_size=ep)
        counter = torch.zeros(1, dtype=torch.int32, device=cuda)
        for dtype in (torch.int32, torch.int64):
            idx = torch.randint(-1, N_LOGICAL, (3000, 8), device=cuda, generator=gen).to(dtype)
            idx[0, 0] = N_LOGICAL + 5  # out of range: flagged and ignored, never read out of bounds
            # The first call of a key runs the custom ops, the next ones the eager fast path
            # (lplb/fast_path.py); the third sums the workload through an exchange in between.
            # With 2 chunks, map_idx walks each chunk in several rounds.
            for n_sms in (37, 2):
                for call in range(3):
                    planner._exchange = (lambda w: w * 2) if call == 2 else None
                    out = planner.run(idx, counter, n_sms=n_sms)
                    torch.cuda.synchronize()
                    assert out.shape == idx.shape
            assert len(planner._fast) > 0, "the fast path was not used"
    print("sanitize run finished, counter", int(counter))


if __name__ == "__main__":
    main()
