"""One causal 4k-token prefill attention call (head_dim 128, 32 query / 8 kv heads, bf16) after
a warm-up, for profiling the prefill kernel under Nsight Compute:

    ncu --launch-skip 1 --launch-count 1 -k regex:prefill python benchmarks/kernels/prefill_once.py
"""

import torch

from kestrel import ops
from kestrel.ops import AttentionMetadata

N, HQ, HKV, D, BS = 4096, 32, 8, 128, 16
blocks = N // BS
kc = torch.randn(blocks, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
vc = torch.randn_like(kc)
q = torch.randn(N, HQ, D, device="cuda", dtype=torch.bfloat16)
qsl = torch.tensor([0, N], dtype=torch.int32)
lens = torch.tensor([N], dtype=torch.int32)
meta = AttentionMetadata(
    slot_mapping=torch.zeros(N, dtype=torch.int64, device="cuda"),
    query_start_loc=qsl.cuda(),
    seq_lens=lens.cuda(),
    block_tables=torch.randperm(blocks, device="cuda").int()[None],
    num_decodes=0,
    num_decode_tokens=0,
    max_query_len=N,
    max_seq_len=N,
    query_start_loc_cpu=qsl,
    seq_lens_cpu=lens,
)
for _ in range(2):
    out = ops.paged_attention(q, kc, vc, meta, D**-0.5)
torch.cuda.synchronize()
print("ok", float(out.float().abs().mean()))
