"""Chapter 13 (training): the loss, the optimizer, the data and the loop that train the course's model, and
chapter 13b's pruning and distillation, which use the same loop.

This file is an index, written by hand: every module it imports is generated from the notebooks
(13_training: losses, optim, data, train, recipe; 13b_prune_distill: prune, distill). The model's modules know nothing of training: training
imports the model, never the reverse.
"""
from .losses import log_softmax, cross_entropy
from .optim import adamw_step, AdamW, cosine_schedule, clip_grad_norm
from .data import TokenData, text_data
from .train import init_weights, TrainLog, lm_loss, evaluate_loss, save_checkpoint, load_checkpoint, train
from .recipe import bits_per_character, sample_text, train_text_model
from .prune import (magnitude_mask, magnitude_prune, sparsity_of, reference_logits, compare_to_reference,   # 13b
                    kv_group_importance, channel_importance, block_influence, importance_scores, remove_kv_groups,
                    remove_ffn_channels, remove_layers, prune_model, parameter_count, decode_timing)
from .distill import kd_loss, distillation_loss, recovered_fraction
