"""Checked facts about the block lists of diffusers' DiTs (diffusers 0.42.1), for the tiny models of tests/tiny_dits.py.

Per class: `lists` in the order the model's forward runs them; per list: attribute `name`, the tiny model's `count`,
`main` (part of the main stack that a cache would split; False for per-stream pre-processing), the block class,
its forward `params` in order, `image` / `text`: the parameter that carries that stream (None: not passed), `stream`:
what the block's `hidden_states` carries ("image", "text", or "joint" = text and image concatenated), `returns`:
"eh" = (encoder_hidden_states, hidden_states), "he" = (hidden_states, encoder_hidden_states), "h" = hidden_states
only, `last_text`: what the LAST block of the list returns for the text stream when it differs ("None" or
"input": the input object unchanged), `positional`: how many leading arguments the model passes positionally, and
`call`: the exact call in the model's forward (no-checkpointing branch). `between`: work the model does between or
around blocks. Verified by running (tests/test_tiny_dits.py) except `call` / `between`, which are read from source.
"""

from __future__ import annotations


def _l(name, count, block, params, image, text, returns, call, positional=0, stream="image", main=True, last_text=None):
    return dict(name=name, count=count, main=main, block=block, params=params, image=image, text=text, stream=stream,
                returns=returns, last_text=last_text, positional=positional, call=call)


H, E = "hidden_states", "encoder_hidden_states"
_FLUX_P = [H, E, "temb", "image_rotary_emb", "joint_attention_kwargs"]
_FLUX_CALL = ("encoder_hidden_states, hidden_states = block(hidden_states=hidden_states, encoder_hidden_states="
              "encoder_hidden_states, temb=temb, image_rotary_emb=image_rotary_emb, joint_attention_kwargs="
              "joint_attention_kwargs)")

BLOCK_FACTS: dict[str, dict] = {
    "SD3Transformer2DModel": dict(real="24 (SD3-medium), 38 (SD3.5-large)", lists=[
        _l("transformer_blocks", 4, "JointTransformerBlock", [H, E, "temb", "joint_attention_kwargs"], H, E, "eh",
           "encoder_hidden_states, hidden_states = block(hidden_states=hidden_states, encoder_hidden_states="
           "encoder_hidden_states, temb=temb, joint_attention_kwargs=joint_attention_kwargs)", last_text="None")],
        between="skip_layers: block index in skip_layers is not called at all; ControlNet after every block with "
                "context_pre_only False: hidden_states = hidden_states + block_controlnet_hidden_states"
                "[int(index_block / (len(blocks) / len(samples)))]. Last block context_pre_only=True."),
    "FluxTransformer2DModel": dict(real="19 + 38", lists=[
        _l("transformer_blocks", 2, "FluxTransformerBlock", _FLUX_P, H, E, "eh", _FLUX_CALL),
        _l("single_transformer_blocks", 2, "FluxSingleTransformerBlock", _FLUX_P, H, E, "eh", _FLUX_CALL)],
        between="ControlNet after every dual block: hidden_states += controlnet_block_samples[i // ceil(n/len)] "
                "(Xlabs: [i % len]); after every single block: += controlnet_single_block_samples[i // ceil(n/len)]. "
                "No concatenation between lists (single blocks concatenate and split internally since 0.35)."),
    "Flux2Transformer2DModel": dict(real="8 + 48 (dev)", lists=[
        _l("transformer_blocks", 2, "Flux2TransformerBlock",
           [H, E, "temb_mod_img", "temb_mod_txt", "image_rotary_emb", "joint_attention_kwargs"], H, E, "eh",
           "encoder_hidden_states, hidden_states = block(hidden_states=hidden_states, encoder_hidden_states="
           "encoder_hidden_states, temb_mod_img=double_stream_mod_img, temb_mod_txt=double_stream_mod_txt, "
           "image_rotary_emb=concat_rotary_emb, joint_attention_kwargs=kv_attn_kwargs)"),
        _l("single_transformer_blocks", 2, "Flux2SingleTransformerBlock",
           [H, E, "temb_mod", "image_rotary_emb", "joint_attention_kwargs", "split_hidden_states", "text_seq_len"],
           H, None, "h", "hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=None, temb_mod="
           "single_stream_mod, image_rotary_emb=concat_rotary_emb, joint_attention_kwargs=kv_attn_kwargs_single)",
           stream="joint")],
        between="Modulations computed once before the loops (the same tensors for every block). Between lists: "
                "hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1); after: hidden_states"
                "[:, num_txt_tokens:]. KV-cache mode sets kv_attn_kwargs['kv_cache'] per block (mutated dict). "
                "Single blocks return a tuple only when split_hidden_states=True (the model never sets it)."),
    "PixArtTransformer2DModel": dict(real="28", lists=[
        _l("transformer_blocks", 4, "BasicTransformerBlock",
           [H, "attention_mask", E, "encoder_attention_mask", "timestep", "cross_attention_kwargs", "class_labels",
            "added_cond_kwargs"], H, E, "h",
           "hidden_states = block(hidden_states, attention_mask=attention_mask, encoder_hidden_states="
           "encoder_hidden_states, encoder_attention_mask=encoder_attention_mask, timestep=timestep, "
           "cross_attention_kwargs=cross_attention_kwargs, class_labels=None)", positional=1)],
        between="none (text is cross-attention context, never updated)"),
    "SanaTransformer2DModel": dict(real="20 / 28 / 60", lists=[
        _l("transformer_blocks", 4, "SanaTransformerBlock",
           [H, "attention_mask", E, "encoder_attention_mask", "timestep", "height", "width"], H, E, "h",
           "hidden_states = block(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, "
           "timestep, post_patch_height, post_patch_width)", positional=7)],
        between="ControlNet AFTER block i for 0 < i <= len(samples): hidden_states = hidden_states + "
                "controlnet_block_samples[i - 1] (block 0 gets none)."),
    "HunyuanDiT2DModel": dict(real="40", lists=[
        _l("blocks", 6, "HunyuanDiTBlock", [H, E, "temb", "image_rotary_emb", "skip"], H, E, "h",
           "hidden_states = block(hidden_states, temb=temb, encoder_hidden_states=encoder_hidden_states, "
           "image_rotary_emb=image_rotary_emb[, skip=skip])", positional=1)],
        between="U-Net-like long skips, L = num_layers: after layer i < L//2 - 1, skips.append(hidden_states) "
                "(push); before layer i > L//2, skip = skips.pop() (+ controlnet_block_samples.pop()) and is passed "
                "as skip= (those blocks own skip_linear). Tiny L=6: push 0,1; pop 4 (gets 1), 5 (gets 0); 2,3 "
                "neither. L=40: push 0..18, pop 21..39, layers 19, 20 neither. Leftover controls raise ValueError."),
    "AuraFlowTransformer2DModel": dict(real="4 + 32", lists=[
        _l("joint_transformer_blocks", 2, "AuraFlowJointTransformerBlock", [H, E, "temb", "attention_kwargs"], H, E,
           "eh", "encoder_hidden_states, hidden_states = block(hidden_states=hidden_states, encoder_hidden_states="
           "encoder_hidden_states, temb=temb, attention_kwargs=attention_kwargs)"),
        _l("single_transformer_blocks", 2, "AuraFlowSingleTransformerBlock", [H, "temb", "attention_kwargs"], H,
           None, "h", "combined_hidden_states = block(hidden_states=combined_hidden_states, temb=temb, "
           "attention_kwargs=attention_kwargs)", stream="joint")],
        between="Before: 8 register tokens prepended to the text (tiny: 7 + 8 = 15 text tokens). Between lists: "
                "combined_hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1) (only if there are "
                "single blocks); after: combined_hidden_states[:, encoder_seq_len:]."),
    "Lumina2Transformer2DModel": dict(real="refiners 2 + 2, layers 26", lists=[
        _l("context_refiner", 2, "Lumina2TransformerBlock", [H, "attention_mask", "image_rotary_emb", "temb"], None, H,
           "h", "encoder_hidden_states = layer(encoder_hidden_states, encoder_attention_mask, context_rotary_emb)",
           positional=3, stream="text", main=False),
        _l("noise_refiner", 2, "Lumina2TransformerBlock", [H, "attention_mask", "image_rotary_emb", "temb"], H, None,
           "h", "hidden_states = layer(hidden_states, None, noise_rotary_emb, temb)", positional=4, main=False),
        _l("layers", 4, "Lumina2TransformerBlock", [H, "attention_mask", "image_rotary_emb", "temb"], H, None, "h",
           "hidden_states = layer(hidden_states, attention_mask if use_mask else None, rotary_emb, temb)",
           positional=4, stream="joint")],
        between="Refiners run first (context_refiner on text without temb, then noise_refiner on image; note "
                "named_children order is noise_refiner, context_refiner, layers). Between refiners and layers: "
                "per-sample packing joint[i] = [text_i[:enc_len_i], image_i] padded to max(seq_lengths), with an "
                "attention mask only when lengths differ; after: per-sample unpack. Main stack = layers."),
    "CogView4Transformer2DModel": dict(real="28", lists=[
        _l("transformer_blocks", 4, "CogView4TransformerBlock",
           [H, E, "temb", "image_rotary_emb", "attention_mask", "attention_kwargs"], H, E, "he",
           "hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states, temb, "
           "image_rotary_emb, attention_mask, attention_kwargs)", positional=6)],
        between="none"),
    "QwenImageTransformer2DModel": dict(real="60", lists=[
        _l("transformer_blocks", 4, "QwenImageTransformerBlock",
           [H, E, "encoder_hidden_states_mask", "temb", "image_rotary_emb", "joint_attention_kwargs",
            "modulate_index"], H, E, "eh",
           "encoder_hidden_states, hidden_states = block(hidden_states=hidden_states, encoder_hidden_states="
           "encoder_hidden_states, encoder_hidden_states_mask=encoder_hidden_states_mask, temb=temb, "
           "image_rotary_emb=image_rotary_emb, joint_attention_kwargs=attention_kwargs, "
           "modulate_index=modulate_index)")],
        between="ControlNet after every block: hidden_states += controlnet_block_samples[i // ceil(n/len)]."),
    "WanTransformer3DModel": dict(real="30 (1.3B) / 40 (14B)", lists=[
        _l("blocks", 4, "WanTransformerBlock", [H, E, "temb", "rotary_emb"], H, E, "h",
           "hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)", positional=4)],
        between="none in the model (I2V concatenates image embeddings before the text once). Wan 2.2: the pipeline "
                "holds transformer (high noise, t >= boundary_ratio * num_train_timesteps) and transformer_2 (low "
                "noise): two models, each with its own blocks, in one generation."),
    "HunyuanVideoTransformer3DModel": dict(real="20 + 40", lists=[
        _l("transformer_blocks", 2, "HunyuanVideoTransformerBlock",
           [H, E, "temb", "attention_mask", "freqs_cis", "args", "kwargs"], H, E, "he",
           "hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states, temb, attention_mask, "
           "image_rotary_emb, token_replace_emb, first_frame_num_tokens)", positional=7),
        _l("single_transformer_blocks", 2, "HunyuanVideoSingleTransformerBlock",
           [H, E, "temb", "attention_mask", "image_rotary_emb", "args", "kwargs"], H, E, "he",
           "hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states, temb, attention_mask, "
           "image_rotary_emb, token_replace_emb, first_frame_num_tokens)", positional=7)],
        between="none between blocks (single blocks concatenate/split internally); text passes the token refiner "
                "(context_embedder.token_refiner.refiner_blocks, nested, not a top-level list) before the blocks."),
    "LTXVideoTransformer3DModel": dict(real="28", lists=[
        _l("transformer_blocks", 4, "LTXVideoTransformerBlock",
           [H, E, "temb", "image_rotary_emb", "encoder_attention_mask"], H, E, "h",
           "hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, "
           "temb=temb, image_rotary_emb=image_rotary_emb, encoder_attention_mask=encoder_attention_mask)")],
        between="none"),
    "CogVideoXTransformer3DModel": dict(real="30 (2B) / 42 (5B)", lists=[
        _l("transformer_blocks", 4, "CogVideoXBlock", [H, E, "temb", "image_rotary_emb", "attention_kwargs"], H, E,
           "he", "hidden_states, encoder_hidden_states = block(hidden_states=hidden_states, encoder_hidden_states="
           "encoder_hidden_states, temb=emb, image_rotary_emb=image_rotary_emb, attention_kwargs=attention_kwargs)")],
        between="none (text and image are split from one patch-embedded sequence before the blocks)"),
    "MochiTransformer3DModel": dict(real="48", lists=[
        _l("transformer_blocks", 4, "MochiTransformerBlock",
           [H, E, "temb", "encoder_attention_mask", "image_rotary_emb"], H, E, "he",
           "hidden_states, encoder_hidden_states = block(hidden_states=hidden_states, encoder_hidden_states="
           "encoder_hidden_states, temb=temb, encoder_attention_mask=encoder_attention_mask, "
           "image_rotary_emb=image_rotary_emb)", last_text="input")],
        between="none. Last block context_pre_only=True returns the INPUT encoder_hidden_states object unchanged "
                "(not None)."),
    "ChromaTransformer2DModel": dict(real="19 + 38", lists=[
        _l("transformer_blocks", 2, "ChromaTransformerBlock",
           [H, E, "temb", "image_rotary_emb", "attention_mask", "joint_attention_kwargs"], H, E, "eh",
           "encoder_hidden_states, hidden_states = block(hidden_states=hidden_states, encoder_hidden_states="
           "encoder_hidden_states, temb=temb, image_rotary_emb=image_rotary_emb, attention_mask=attention_mask, "
           "joint_attention_kwargs=joint_attention_kwargs)"),
        _l("single_transformer_blocks", 2, "ChromaSingleTransformerBlock",
           [H, "temb", "image_rotary_emb", "attention_mask", "joint_attention_kwargs"], H, None, "h",
           "hidden_states = block(hidden_states=hidden_states, temb=temb, image_rotary_emb=image_rotary_emb, "
           "attention_mask=attention_mask, joint_attention_kwargs=joint_attention_kwargs)", stream="joint")],
        between="Per-block conditioning slices of pooled_temb: dual block i gets cat(pooled_temb[:, o+6i : o+6i+6], "
                "pooled_temb[:, o2+6i : o2+6i+6]) with o = 3*n_single, o2 = o + 6*n_dual; single block i gets "
                "pooled_temb[:, 3i : 3i+3]. ControlNet adds after dual blocks; between lists hidden_states = "
                "torch.cat([encoder_hidden_states, hidden_states], dim=1); single-block ControlNet adds IN PLACE into "
                "hidden_states[:, txt_len:]; after: hidden_states[:, txt_len:]."),
    "HiDreamImageTransformer2DModel": dict(real="16 + 32", lists=[
        _l("double_stream_blocks", 2, "HiDreamBlock(HiDreamImageTransformerBlock)",
           [H, "hidden_states_masks", E, "temb", "image_rotary_emb"], H, E, "he",
           "hidden_states, initial_encoder_hidden_states = block(hidden_states=hidden_states, hidden_states_masks="
           "hidden_states_masks, encoder_hidden_states=cur_encoder_hidden_states, temb=temb, image_rotary_emb="
           "image_rotary_emb)"),
        _l("single_stream_blocks", 2, "HiDreamBlock(HiDreamImageSingleTransformerBlock)",
           [H, "hidden_states_masks", E, "temb", "image_rotary_emb"], H, None, "h",
           "hidden_states = block(hidden_states=hidden_states, hidden_states_masks=hidden_states_masks, "
           "encoder_hidden_states=None, temb=temb, image_rotary_emb=image_rotary_emb)", stream="joint")],
        between="A different Llama layer enters every block (block_id over both lists; llama_layers needs n_dual + "
                "n_single entries): dual: cur = cat([initial_encoder_hidden_states, llama[block_id]], 1) before, "
                "initial_encoder_hidden_states = out[:, :initial_len] after (the text output is longer than the text "
                "carried on); between lists hidden_states = cat([hidden_states, initial_encoder_hidden_states], 1) "
                "(image FIRST); single: hidden_states = cat([hidden_states, llama[block_id]], 1) before, "
                "hidden_states[:, :joint_len] after; finally [:, :image_len]. Blocks are HiDreamBlock wrappers "
                "(.block is the real block); caption_projection is also a ModuleList (not blocks)."),
    "AllegroTransformer3DModel": dict(real="32", lists=[
        _l("transformer_blocks", 4, "AllegroTransformerBlock",
           [H, E, "temb", "attention_mask", "encoder_attention_mask", "image_rotary_emb"], H, E, "h",
           "hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, "
           "temb=timestep, attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask, "
           "image_rotary_emb=image_rotary_emb)")],
        between="none"),
}
