"""The fused LSTM at sizes where its time loop runs on a team of threads (one parallel region per call, threads
meeting at a barrier between steps), against torch.nn.LSTM.

test_lstm.py uses tiny sizes, whose steps run on one thread. Here a step's recurrent product is large enough
(2 * batch * 4H * P >= 2^16 FLOPs) for the team: hidden sizes of one block of units (rows are split among the
threads), of an odd number of blocks and of many; packed batches whose reverse direction starts sequences in
the middle of the loop; a projection (a second barrier per step); 1 and 2 threads.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

from fusedlayers.nn import LSTM

from test_lstm import TOL, compare_forward_backward, make_lstm_pair

# (hidden, proj, batch): one 32-unit block with rows split; three blocks (odd among 2 threads); batch 1 (the
# latency case); a projection.
SIZES = [(32, 0, 40), (96, 0, 4), (128, 0, 1), (64, 40, 6)]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("hidden,proj,batch", SIZES, ids=[f"H{h}_P{p}_B{b}" for h, p, b in SIZES])
def test_team_loop_matches_torch(threads, hidden, proj, batch, packed, dtype):
    ref, ours = make_lstm_pair(16, hidden, num_layers=2, bidirectional=True, proj_size=proj, dtype=dtype)
    lengths = [7 - (k * 5) // max(1, batch - 1) for k in range(batch)] if packed else [7] * batch
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(3)).tolist()

    def make_args():
        g = torch.Generator().manual_seed(4)
        seqs = [torch.randn(lengths[k], 16, generator=g, dtype=dtype).requires_grad_() for k in order]
        if packed:
            return seqs, (pack_sequence(seqs, enforce_sorted=False),)
        x = torch.stack(seqs, dim=1).detach().requires_grad_()
        return [x], (x,)

    compare_forward_backward(ref, ours, make_args, TOL[dtype])


@pytest.mark.parametrize("hidden,proj,batch", SIZES, ids=[f"H{h}_P{p}_B{b}" for h, p, b in SIZES])
def test_team_loop_without_grad_matches_torch(threads, hidden, proj, batch):
    ref, ours = make_lstm_pair(24, hidden, proj_size=proj, dtype=torch.float32)
    x = torch.randn(9, batch, 24)
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
    torch.testing.assert_close(got[0], expected[0], **TOL[torch.float32])
    torch.testing.assert_close(got[1][0], expected[1][0], **TOL[torch.float32])
    torch.testing.assert_close(got[1][1], expected[1][1], **TOL[torch.float32])


def test_team_loop_bfloat16_close_to_float32(threads):
    torch.manual_seed(0)
    ours = LSTM(32, 128, bidirectional=True)
    x = torch.randn(6, 3, 32)
    with torch.no_grad():
        expected, (h_f, c_f) = ours(x)
        got, (h_b, c_b) = ours.to(torch.bfloat16)(x.bfloat16())
    for a, b in ((got, expected), (h_b, h_f), (c_b, c_f)):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)
