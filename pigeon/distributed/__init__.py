"""pigeon on torch.distributed (gloo on CPUs, NCCL on GPUs): target-node partitioning with k-hop halos
(partition.py), data-parallel training of compiled RGNNs (ddp.py, launch.py), mini-batch training over
neighbour-sampled blocks (sampling.py, minibatch.py) and sequence-parallel attention (seq_attention.py).
Tested on CPUs with gloo only (tests/test_distributed_*.py)."""
from .partition import METHODS, Partition, assign_targets, halo_sets, partition
from .sampling import Block, NeighborSampler, SamplerError, epoch_batches

__all__ = ["METHODS", "Partition", "assign_targets", "halo_sets", "partition", "Block", "NeighborSampler",
           "SamplerError", "epoch_batches"]
