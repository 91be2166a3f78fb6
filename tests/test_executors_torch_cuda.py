"""The torch executor on one CUDA GPU (NCCL, a world of 1): large rows (per-row commit) and
small rows (one scatter) end bit-exact, asynchronously on the side stream; checksums equal the CPU's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import needs_gpu

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import socket, numpy as np, torch, torch.distributed as dist
    import eplb
    from eplb.executors import torch as executor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    layers, slots = 3, 5
    old = np.tile(np.arange(slots), (layers, 1))
    new = np.stack([np.roll(old[0], 1), old[1], np.array([4, 4, 0, 1, 2])])  # a chain, nothing, a second copy
    plan = eplb.plan_transfers(old, new, num_gpus=1)

    def weights(phy2log):
        base = torch.as_tensor(phy2log, device="cuda")[:, :, None] * 1000 + torch.arange(layers, device="cuda")[
            :, None, None]
        big = (base[..., None] + torch.arange(1 << 20, device="cuda")).to(torch.float32)  # 4 MiB per slot
        small = (base + torch.arange(3, device="cuda")).to(torch.bfloat16)
        return {"big": big.contiguous(), "small": small.contiguous()}

    w = weights(old)
    pending = executor.begin(plan, w)
    torch.cuda.synchronize()
    assert pending.done()
    pending.finish()
    want = weights(new)
    assert all(torch.equal(w[k], want[k]) for k in w), "apply_plan on CUDA"
    executor.apply_plan(plan, w, layers=[0])  # only layer 0, again: its copies are by slot, so it rolls twice
    twice = new.copy()
    twice[0] = np.roll(old[0], 2)
    want = weights(twice)
    assert all(torch.equal(w[k], want[k]) for k in w), "a partial layer set on CUDA"
    rows = w["big"].view(-1, 1 << 20)
    assert torch.equal(executor._word_sums(rows).cpu(), executor._word_sums(rows.cpu())), "checksums"
    print("cuda executor ok")
    """
)


@needs_gpu("torch")
def test_world_of_one_on_cuda():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cuda executor ok" in out.stdout
