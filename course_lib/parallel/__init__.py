"""Chapter 12 (beyond one device): tensor parallelism over torch.distributed (gloo on CPUs, the same code with
nccl on GPUs), Hugging Face's tensor-parallel slicing, and Mixture-of-Experts with expert parallelism.

This file is an index, written by hand: every module it imports is generated from the notebooks
(12_tensor_parallel, 12b_moe). Parallelism imports the model, never the reverse.
"""
from .tensor import (Collectives, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelOutput,
                     row_parallel_linear, gqa_head_split, shard_spec, shard_model, load_gguf_shard, tp_bytes_per_token)
from .launch import run_tensor_parallel, tensor_parallel_logits, tensor_parallel_generate, random_model, load_rank
from .experts import experts_of_rank, ExpertParallelMoE, expert_parallel_forward, run_gloo
