"""The Ulysses all-to-alls of one 720p DiT block on 2 GPUs, under NCCL settings: is NCCL's point-to-point rate the
limit, and which setting lifts it? One process pair per setting (NCCL reads its environment once, at init).

    python bench/a2a_nccl.py                      # every setting below, a table; writes the best to --best-env
    python bench/a2a_nccl.py --best-env env.sh    # that file then holds `export ...` lines for the winner

Per setting: `raw` is one all_to_all_single of a contiguous buffer as large as a block's traffic (q, k, v in and
the attention output back: 4 x 40 heads x 37800 tokens x 128 x bf16 per rank), in GB/s sent per rank (half of it
to the other card, half to itself); `block` is SequenceSplit's tokens_to_heads of q, k, v stacked plus
heads_to_tokens of the attention output, permutes included (bench/multigpu.py's sp2_a2a_block figure).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends), as everywhere in this project.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turbowan.ops.sequence_parallel import SequenceSplit  # noqa: E402

SETTINGS = {
    "default": {},
    "min 32 channels": {"NCCL_MIN_NCHANNELS": "32"},
    "min 16 p2p channels": {"NCCL_MIN_P2P_NCHANNELS": "16"},
    "32 p2p channels, 32 channels": {"NCCL_MIN_P2P_NCHANNELS": "32", "NCCL_MIN_NCHANNELS": "32"},
    "nvl chunk 2 MB": {"NCCL_P2P_NVL_CHUNKSIZE": str(2 << 20)},
}  # NCCL_P2P_USE_CUDA_MEMCPY=1 (copy engines) was tried too: the pair of processes hung at NCCL 2.28.9
TOKENS, HEADS, HEAD_DIM = 75600, 40, 128  # 720p, 81 frames, A14B


def _median_s(fn, device, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(rank: int, world: int, env: dict, out: str) -> None:
    os.environ.update(env)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{out}.store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=2), device_id=device)
    try:
        sp = SequenceSplit(TOKENS, HEADS)
        qkv = torch.randn(3, sp.local, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        attn = torch.randn(1, TOKENS, HEADS // world, HEAD_DIM, device=device, dtype=torch.bfloat16)
        send = torch.randn(4 * sp.local * HEADS * HEAD_DIM, device=device, dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        raw = _median_s(lambda: dist.all_to_all_single(recv, send), device)
        block = _median_s(lambda: (sp.tokens_to_heads(qkv), sp.heads_to_tokens(attn)), device)
        if rank == 0:
            Path(out).write_text(json.dumps({"raw_ms": raw * 1e3, "raw_gbs": send.numel() * 2 / raw / 1e9,
                                             "block_ms": block * 1e3}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--best-env", help="write `export` lines of the fastest setting (by block time) here")
    args = ap.parse_args()
    world = 2
    print(f"{world}x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}\n")
    print("| setting | raw all_to_all ms | GB/s sent per rank | block's two all-to-alls ms |\n|---|---|---|---|")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in SETTINGS.items():
            out = os.path.join(tmp, name.replace(" ", "_").replace(",", ""))
            try:
                mp.start_processes(worker, args=(world, env, out), nprocs=world, start_method="spawn")
                r = json.loads(Path(out).read_text())
            except Exception as exc:  # a setting this NCCL refuses: say so and go on
                print(f"| {name} | failed: {str(exc).splitlines()[-1][:80]} | | |", flush=True)
                continue
            results[name] = r
            print(f"| {name} | {r['raw_ms']:.2f} | {r['raw_gbs']:.0f} | {r['block_ms']:.2f} |", flush=True)
    if results and args.best_env:
        best = min(results, key=lambda n: results[n]["block_ms"])
        Path(args.best_env).write_text("".join(f"export {k}={v}\n" for k, v in SETTINGS[best].items()))
        print(f"\nfastest block: {best} ({results[best]['block_ms']:.2f} ms against "
              f"{results.get('default', {}).get('block_ms', float('nan')):.2f} ms by default)")


if __name__ == "__main__":
    main()
