"""What FSDP2 and DeepSpeed ZeRO-3 need from quietstar beyond accelerate's own preparation.

Both were found by running them (tests/test_distributed.py, two CPU processes with the sharded
code paths): each works around one way the wrapped model differs from a plain transformers LM.
"""

from __future__ import annotations

from quietstar.models.modeling import QuietStarForCausalLM


def build_model_whole(build, accelerator):
    """DeepSpeed: ``build()`` (the model builder) with every process loading the whole base model.

    accelerate's DeepSpeed plugin registers its config with transformers even when
    zero3_init_flag is false, and under ZeRO-3 transformers then partitions the weights while
    loading (deepspeed.zero.Init). QuietStarForCausalLM.from_base reads the embedding matrix (the
    START/END initial vectors), which a partitioned parameter does not hold. ``accelerator.prepare``
    partitions the finished model.
    """
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        return build()
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def shard_lm_embedding(model: QuietStarForCausalLM, accelerator) -> None:
    """FSDP2: makes the LM's input embedding (with the output head when tied to it) one FSDP unit.

    accelerate's FSDP2 preparation shards ``model.get_input_embeddings()`` as a unit of its own,
    which here is the MetaTokenEmbedding: it holds the LM's embedding module, which is also a
    child of the LM, so the root unit would take the already sharded weight a second time and
    ``fully_shard`` fails. Made an FSDP unit first, the embedding is skipped by both, and the
    MetaTokenEmbedding unit keeps only the START/END vectors. A tied head must be in the same
    unit: sharding the embedding alone would replace its weight and silently untie the head.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    mesh = accelerator.torch_device_mesh
    embed, head = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    # The same settings as accelerate gives the units it makes (fsdp2_prepare_model).
    fully_shard([embed, head] if head.weight is embed.weight else embed,
                reshard_after_forward=plugin.reshard_after_forward, offload_policy=plugin.cpu_offload,
                mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
                mesh=mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None)
