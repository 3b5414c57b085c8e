"""Checks of the NxD doubles at two ranks, run by ``test_nxd_doubles_contract.py`` under
``torchrun --nproc_per_node 2`` on torch-xla's CPU device (collectives over gloo).

Each check compares a double's tensor-parallel result with the dense computation it stands for, on data every
rank draws from the same seed. Rank 0 prints ``PASS <name>`` per check; any failure raises (non-zero exit).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    mode = sys.argv[1]
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)
    from neuronx_distributed.parallel_layers import grads, layers, parallel_state

    dist.init_process_group("xla")
    rank = dist.get_rank()
    device = xm.xla_device()

    def report(name: str) -> None:
        if rank == 0:
            print(f"PASS {name}", flush=True)

    if mode == "missing-rank":
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        from neuronx_distributed.trainer import save_checkpoint

        if rank == 0:  # rank 1 never calls save_checkpoint
            save_checkpoint(sys.argv[2], "tag", model={"w": torch.zeros(2)})
        else:
            import time

            time.sleep(8)
        return

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(mode))
    tp = parallel_state.get_tensor_model_parallel_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if tp == 2:
        assert parallel_state.get_tensor_model_parallel_replica_groups() == [[0, 1]]
        assert parallel_state.get_data_parallel_replica_groups() == [[0], [1]]
        assert (tp_rank, parallel_state.get_data_parallel_rank()) == (rank, 0)
    else:
        assert parallel_state.get_data_parallel_replica_groups() == [[0, 1]]
        assert parallel_state.get_data_parallel_rank() == rank
    report(f"rank grid tp={tp}")

    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    w1, w2 = torch.randn(12, 8), torch.randn(8, 12)
    bias2 = torch.randn(8)
    dense = torch.nn.functional.linear(torch.nn.functional.linear(x, w1), w2, bias2)

    if tp == 2:
        # Column then row parallel (the MLP / attention pattern): forward and input gradient equal the dense.
        column = layers.ColumnParallelLinear(8, 12, bias=False, gather_output=False)
        row = layers.RowParallelLinear(12, 8, bias=True, input_is_parallel=True)
        with torch.no_grad():
            column.weight.copy_(layers.create_local_weight(w1, 0, 6, 1))
            row.weight.copy_(layers.create_local_weight(w2, 1, 6, 1))
            row.bias.copy_(bias2)
        assert column.weight.partition_dim == 0 and row.weight.partition_dim == 1
        assert column.weight.num_partitions == 2 and row.weight.tensor_model_parallel
        column, row = column.to(device), row.to(device)
        xx = x.clone().to(device).requires_grad_(True)
        out = row(column(xx))
        torch.testing.assert_close(out.cpu(), dense, rtol=1e-5, atol=1e-5)
        report("column + row parallel forward")
        out.sum().backward()
        xd = x.clone().requires_grad_(True)
        torch.nn.functional.linear(torch.nn.functional.linear(xd, w1), w2, bias2).sum().backward()
        torch.testing.assert_close(xx.grad.cpu(), xd.grad, rtol=1e-5, atol=1e-5)
        report("column + row parallel input gradient (copy-to-region all-reduce)")

        # Strided create_local_weight: rank r keeps pieces r::tp of size per_partition / stride.
        full = torch.arange(8.0)
        local = layers.create_local_weight(full, 0, 4, 2)
        expected = torch.cat([full[0:2], full[4:6]]) if tp_rank == 0 else torch.cat([full[2:4], full[6:8]])
        assert torch.equal(local, expected), local
        report("create_local_weight stride 2")

        # Vocabulary-parallel embedding: ids outside this rank's range give zero rows, then all-reduce.
        table = torch.randn(10, 4)
        ids = torch.tensor([[0, 3, 5, 9, 7]])
        embedding = layers.ParallelEmbedding(10, 4)
        with torch.no_grad():
            embedding.weight.copy_(table[tp_rank * 5 : (tp_rank + 1) * 5])
        got = embedding.to(device)(ids.to(device))
        torch.testing.assert_close(got.cpu(), torch.nn.functional.embedding(ids, table))
        report("parallel embedding")

        # optimum-neuron's parallel cross-entropy over vocabulary-split logits equals the dense loss.
        from optimum.neuron.models.training.loss_utils import parallel_cross_entropy

        logits = torch.randn(6, 10)
        target = torch.tensor([1, 7, -100, 4, 9, 0])
        local_logits = logits[:, tp_rank * 5 : (tp_rank + 1) * 5].clone().to(device).requires_grad_(True)
        loss = parallel_cross_entropy(local_logits, target.to(device), ignore_index=-100, reduction="mean")
        dense_logits = logits.clone().requires_grad_(True)
        expected_loss = torch.nn.functional.cross_entropy(dense_logits, target, ignore_index=-100)
        torch.testing.assert_close(loss.cpu(), expected_loss.detach(), rtol=1e-5, atol=1e-5)
        loss.backward()
        expected_loss.backward()
        own = dense_logits.grad[:, tp_rank * 5 : (tp_rank + 1) * 5]
        torch.testing.assert_close(local_logits.grad.cpu(), own, rtol=1e-5, atol=1e-6)
        report("parallel cross-entropy, loss and logit gradient")

        # Clipping: a split parameter counts its shard on each rank, a whole one counts once (sum / tp).
        split = torch.nn.Parameter(torch.zeros(2, 3, device=device))
        split.tensor_model_parallel = True
        whole = torch.nn.Parameter(torch.zeros(4, device=device))
        split_grad_full = torch.randn(4, 3)
        whole_grad = torch.randn(4)
        split.grad = split_grad_full[tp_rank * 2 : (tp_rank + 1) * 2].clone().to(device)
        whole.grad = whole_grad.clone().to(device)
        norm = grads.clip_grad_norm([split, whole], max_norm=0.5)
        dense_norm = torch.linalg.vector_norm(torch.cat([split_grad_full.flatten(), whole_grad]))
        torch.testing.assert_close(norm.cpu(), dense_norm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            whole.grad.cpu(), whole_grad * (0.5 / (dense_norm + 1e-6)), rtol=1e-5, atol=1e-6
        )
        report("gradient norm reduced over the tensor-parallel group")

        # GQA QKV layer: 2 query heads, 1 key/value head copied on both ranks (kv_size_multiplier 2). Each rank's
        # loss uses its query head with its copy of the key/value head; the dense loss sums both heads over
        # the one shared head. Outputs, the input gradient and every weight gradient equal the dense ones:
        # each copy of wk / wv gets the gradient of the shared head (the copies stay equal).
        from neuronx_distributed.modules.qkv_linear import GQAQKVColumnParallelLinear

        wq, wk, wv = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
        cq, cv = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
        xd = x.clone().requires_grad_(True)
        dq, dk, dv = (t.clone().requires_grad_(True) for t in (wq, wk, wv))
        q, k, v = xd @ dq.t(), xd @ dk.t(), xd @ dv.t()
        dense_loss = sum((q[..., 4 * h : 4 * h + 4] * k * cq[h]).sum() + (v * cv[h]).sum() for h in (0, 1))
        dense_loss.backward()
        for fuse in (False, True):
            layer = GQAQKVColumnParallelLinear(
                8, [8, 4], bias=False, gather_output=False, kv_size_multiplier=2, fuse_qkv=fuse
            )
            assert (layer.q_output_size_per_partition, layer.kv_output_size_per_partition) == (4, 4)
            assert parallel_state.get_kv_shared_replica_groups() == [[0, 1]]
            local = [wq[4 * tp_rank : 4 * tp_rank + 4], wk, wv]
            with torch.no_grad():
                if fuse:
                    layer.weight_qkv.copy_(torch.cat(local))
                else:
                    for param, value in zip((layer.weight_q, layer.weight_k, layer.weight_v), local):
                        param.copy_(value)
            layer = layer.to(device)
            xx = x.clone().to(device).requires_grad_(True)
            lq, lk, lv = layer(xx)
            torch.testing.assert_close(
                lq.cpu(), q[..., 4 * tp_rank : 4 * tp_rank + 4].detach(), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(lk.cpu(), k.detach(), rtol=1e-5, atol=1e-5)
            (
                (lq * k.new_tensor(cq[tp_rank]).to(device) * lk).sum() + (lv * cv[tp_rank].to(device)).sum()
            ).backward()
            torch.testing.assert_close(xx.grad.cpu(), xd.grad, rtol=1e-4, atol=1e-4)
            if fuse:
                got_q, got_k, got_v = torch.split(layer.weight_qkv.grad.cpu(), [4, 4, 4])
            else:
                got_q, got_k, got_v = (w.grad.cpu() for w in (layer.weight_q, layer.weight_k, layer.weight_v))
            torch.testing.assert_close(got_q, dq.grad[4 * tp_rank : 4 * tp_rank + 4], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_k, dk.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_v, dv.grad, rtol=1e-4, atol=1e-4)
            report(f"GQA QKV layer {'fused' if fuse else 'unfused'}: outputs, input and weight gradients")
        # A frozen fused weight (LoRA's base): NxD 0.15's backward fails (qkv_linear_utils.py reads
        # ctx.saved_tensors[:1], a tuple); the unfused layer trains its input gradient.
        for fuse in (True, False):
            layer = GQAQKVColumnParallelLinear(
                8, [8, 4], bias=False, gather_output=False, kv_size_multiplier=2, fuse_qkv=fuse
            ).to(device)
            layer.requires_grad_(False)
            xx = x.clone().to(device).requires_grad_(True)
            out = sum(o.sum() for o in layer(xx))
            try:
                out.backward()
                failed = False
            except TypeError as exc:
                failed = "tuple" in str(exc)
            assert failed is fuse, (fuse, failed)
        report("GQA QKV layer frozen: fused fails in backward as NxD's does, unfused trains")
        # Sequence-parallel gradient sums drop the return value (optimum-neuron's
        # allreduce_sequence_parallel_gradients): NxD reduces the tensor in place.
        from neuronx_distributed.parallel_layers.mappings import reduce_from_tensor_model_parallel_region

        g = torch.full((3,), float(tp_rank + 1), device=device)
        reduce_from_tensor_model_parallel_region(g)
        assert torch.equal(g.cpu(), torch.full((3,), 3.0)), g
        report("tensor-parallel reduce of a gradient is in place")
    else:
        # Data parallel: gradients averaged over both ranks (NxD sums with scale 1/dp).
        g = torch.full((3,), float(rank + 1), device=device)
        grads.bucket_allreduce_gradients([g])
        assert torch.equal(g.cpu(), torch.full((3,), 1.5)), g
        report("bucket all-reduce averages over data-parallel ranks")

        # save_checkpoint with xser spreads tensor files over the data-parallel ranks (NxD's bins).
        from neuronx_distributed.trainer import save_checkpoint
        from neuronx_distributed.trainer.checkpoint import assign_tensors_to_bins

        state = {"a": torch.zeros(10), "b": torch.zeros(1), "c": torch.zeros(5), "d": torch.zeros(7)}
        bins = assign_tensors_to_bins([t.numel() * 4 for t in state.values()], 2)
        assert bins == [[1, 3], [2, 0]], bins  # ascending size b, c, d, a; each to the smaller bin
        root = sys.argv[2]
        written: list[str] = []
        real_save = torch.save

        def recording_save(obj, path, *args, **kwargs):
            written.append(os.path.basename(str(path)))
            return real_save(obj, path, *args, **kwargs)

        torch.save = recording_save
        try:
            save_checkpoint(root, "tag", model=state, use_xser=True)
        finally:
            torch.save = real_save
        folder = os.path.join(root, "tag", "model", "dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors")
        assert sorted(os.listdir(folder)) == [f"tensor_{i}.pt" for i in range(4)]
        mine = sorted(name for name in written if name.startswith("tensor_"))
        assert mine == sorted(f"tensor_{i}.pt" for i in bins[rank]), (rank, written)
        # Data-parallel rank 0 alone writes the reference file and its tensor info.
        assert ("dp_rank_00_tp_rank_00_pp_rank_00.pt" in written) is (rank == 0)
        assert os.path.isfile(os.path.join(root, "tag", "done"))
        report("save_checkpoint spreads tensor files over data-parallel ranks")
    dist.barrier(group=dist.new_group(backend="gloo"))


if __name__ == "__main__":
    main()
