"""The single source of truth for README's "Supported pipelines and features" table.

Every row names the tests that back it; ``tests/test_pipelines.py`` checks that each named test exists
(as collected by pytest) and that README's table equals :func:`table`. Regenerate README's section with::

    python -m tests.support_matrix
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"

P = "tests/test_pipelines.py::"
S = "tests/test_schedulers.py::"
C = "tests/test_composition.py::"
H = "tests/test_helper.py::"
E = "tests/test_exactness.py::"
D = "tests/test_dit.py::"
DP = "tests/test_dit_pipelines.py::"


DIT_CLASSES = (
    "SD3Transformer2DModel", "FluxTransformer2DModel", "Flux2Transformer2DModel", "PixArtTransformer2DModel",
    "SanaTransformer2DModel", "HunyuanDiT2DModel", "AuraFlowTransformer2DModel", "Lumina2Transformer2DModel",
    "CogView4Transformer2DModel", "QwenImageTransformer2DModel", "WanTransformer3DModel",
    "HunyuanVideoTransformer3DModel", "LTXVideoTransformer3DModel", "CogVideoXTransformer3DModel",
    "MochiTransformer3DModel", "ChromaTransformer2DModel", "HiDreamImageTransformer2DModel", "AllegroTransformer3DModel",
)
DIT_PIPELINES = (
    ("FluxPipeline", "FluxPipeline with true CFG (a cond and an uncond call per step, each its own cache)"),
    ("StableDiffusion3Pipeline", "StableDiffusion3Pipeline (batched CFG)"),
    ("PixArtSigmaPipeline", "PixArtSigmaPipeline (batched CFG)"),
    ("SanaPipeline", "SanaPipeline (batched CFG)"),
    ("WanPipeline", "WanPipeline 2.1 (cond and uncond calls)"),
    ("CogView4Pipeline", "CogView4Pipeline (cond and uncond calls)"),
    ("QwenImagePipeline", "QwenImagePipeline with true CFG"),
    ("Lumina2Pipeline", "Lumina2Pipeline with cfg_trunc_ratio (the uncond call stops mid-run)"),
    ("FluxControlNetPipeline", "FluxControlNetPipeline (the ControlNet runs every step; its residuals for the middle "
     "blocks come from the cached residual)"),
    ("StableDiffusion3ControlNetPipeline", "StableDiffusion3ControlNetPipeline (likewise)"),
)


@dataclass(frozen=True)
class Row:
    feature: str
    status: str  # "yes", "yes (simulated on CPU)", "no: <why>"
    tests: tuple[str, ...]


def _pipe(name: str) -> str:
    return f"{P}test_pipeline[{name}]"


ROWS: tuple[Row, ...] = (
    # -- pipelines
    Row("StableDiffusionPipeline", "yes", (_pipe("StableDiffusionPipeline"), f"{E}test_pipeline_equals_original_rule_for_every_branch[sd]")),
    Row("StableDiffusionImg2ImgPipeline", "yes", (_pipe("StableDiffusionImg2ImgPipeline"), f"{H}test_img2img_after_txt2img_equals_a_fresh_img2img")),
    Row(
        "StableDiffusionInpaintPipeline (9-channel and 4-channel U-Net)",
        "yes",
        (_pipe("StableDiffusionInpaintPipeline-9ch"), _pipe("StableDiffusionInpaintPipeline-4ch")),
    ),
    Row("StableDiffusionXLPipeline", "yes", (_pipe("StableDiffusionXLPipeline"), f"{E}test_pipeline_equals_original_rule_for_every_branch[sdxl]")),
    Row("StableDiffusionXLImg2ImgPipeline", "yes", (_pipe("StableDiffusionXLImg2ImgPipeline"),)),
    Row(
        "StableDiffusionXLInpaintPipeline",
        "yes",
        (_pipe("StableDiffusionXLInpaintPipeline"), _pipe("StableDiffusionXLInpaintPipeline-9ch")),
    ),
    Row(
        "SDXL base + refiner (denoising_end / denoising_start; own or shared U-Net)",
        "yes",
        (f"{P}test_sdxl_base_and_refiner[own-unet]", f"{P}test_sdxl_base_and_refiner[shared-unet]"),
    ),
    Row(
        "StableDiffusionControlNetPipeline (on retrieval steps only the shallow part of the ControlNet runs)",
        "yes",
        (
            _pipe("StableDiffusionControlNetPipeline"),
            f"{P}test_on_a_retrieval_step_only_the_residuals_it_consumes_matter[*]",
            f"{P}test_controlnet_runs_only_its_shallow_part_on_retrieval_steps[single-*]",
        ),
    ),
    Row(
        "Multi-ControlNet",
        "yes",
        (
            _pipe("StableDiffusionControlNetPipeline-multi"),
            f"{P}test_controlnet_runs_only_its_shallow_part_on_retrieval_steps[multi-*]",
        ),
    ),
    Row("StableDiffusionXLControlNetPipeline", "yes", (_pipe("StableDiffusionXLControlNetPipeline"),)),
    Row("T2I-Adapter (StableDiffusionAdapterPipeline)", "yes", (_pipe("StableDiffusionAdapterPipeline"),)),
    Row("IP-Adapter", "yes", (_pipe("IP-Adapter"),)),
    Row(
        "LoRA (PEFT), fuse_lora / unfuse_lora while enabled",
        "yes",
        (_pipe("LoRA"), f"{P}test_fuse_and_unfuse_lora_while_enabled", f"{P}test_lora_added_while_enabled_is_used"),
    ),
    Row(
        "StableVideoDiffusionPipeline (UNetSpatioTemporalConditionModel)",
        "yes",
        (_pipe("StableVideoDiffusionPipeline"), f"{P}test_unet_class_layers_and_original_rule_for_every_branch[UNetSpatioTemporalConditionModel]"),
    ),
    Row(
        "DDPMPipeline, DDIMPipeline, LDMPipeline (UNet2DModel)",
        "yes",
        (
            _pipe("DDPMPipeline"),
            _pipe("DDIMPipeline"),
            _pipe("LDMPipeline"),
            f"{P}test_unet_class_layers_and_original_rule_for_every_branch[UNet2DModel]",
        ),
    ),
    Row(
        "AnimateDiffPipeline (UNetMotionModel)",
        "yes",
        (_pipe("AnimateDiffPipeline"), f"{P}test_unet_class_layers_and_original_rule_for_every_branch[UNetMotionModel]"),
    ),
    Row(
        "TextToVideoSDPipeline, VideoToVideoSDPipeline (UNet3DConditionModel)",
        "yes",
        (
            _pipe("TextToVideoSDPipeline"),
            _pipe("VideoToVideoSDPipeline"),
            f"{P}test_unet_class_layers_and_original_rule_for_every_branch[UNet3DConditionModel]",
        ),
    ),
    Row(
        "UNet2DModel with skip-sample blocks (SkipDownBlock2D, AttnSkip*)",
        "no: a second running sample threads through every up block; raises TypeError",
        (f"{P}test_skip_sample_unet2d_is_rejected", f"{P}test_unsupported_pipeline_is_rejected_at_enable_not_ignored"),
    ),
    Row(
        "k-diffusion U-Net blocks (KDownBlock2D, KUpBlock2D, ...)",
        "no: an up block consumes one skip, not one per layer; raises TypeError",
        (f"{P}test_k_diffusion_blocks_are_rejected",),
    ),
    Row(
        "Other U-Net classes (UNet1DModel, I2VGenXLUNet, UNetControlNetXSModel, ...) and other denoisers",
        "no: raises TypeError naming the supported U-Nets and transformers",
        (f"{P}test_other_unet_classes_name_the_supported_ones", f"{H}test_unsupported_objects_are_rejected_clearly"),
    ),
    # -- diffusion transformers (diffusers >= 0.35)
    *(
        Row(f"Transformer: {name}", "yes (every branch, every split, CFG branches; diffusers >= 0.35)",
            (f"{D}test_every_branch_and_interval_matches_the_reference_with_cfg_as_separate_calls[{name}]",
             f"{D}test_every_asymmetric_split_matches_the_reference_and_an_empty_middle_is_a_full_step[{name}]"))
        for name in DIT_CLASSES
    ),
    *(
        Row(f"{label}", "yes", (f"{DP}test_cached_pipeline_calls_equal_the_reference_and_disable_restores[{name}]",))
        for name, label in DIT_PIPELINES
    ),
    Row("Wan 2.2 (transformer and transformer_2 in one call: steps counted across both)", "yes",
        (f"{DP}test_wan22_counts_steps_across_its_two_transformers",
         f"{DP}test_cached_pipeline_calls_equal_the_reference_and_disable_restores[WanPipeline2.2]",
         "tests/test_dit_wan22_calibration.py::test_calibrate_chooses_over_both_transformers_and_the_engine_makes_the_"
         "predicted_error[3]")),
    Row("Transformer: torch.compile(fullgraph=True), two graphs, no recompiles", "yes",
        (f"{D}test_compiled_fullgraph_two_graphs_no_recompiles_equal_to_eager",
         f"{D}test_inductor_compiles_two_graphs_close_to_eager")),
    Row("Transformer: diffusers' DiTTransformer2DModel (class-conditional DiT) and unlisted transformers",
        "no: raises TypeError naming the supported transformers", (f"{D}test_bad_input_names_the_valid_choices",)),
    Row("U-Nets without a mid block", "no: raises ValueError", (f"{P}test_unet_without_mid_block_is_rejected",)),
    # -- schedulers
    *(
        Row(f"Scheduler: {name}", "yes", (f"{S}test_scheduler_end_to_end[{key}]",))
        for name, key in (
            ("DDIM", "DDIM"),
            ("PNDM / PLMS", "PNDM-PLMS"),
            ("Euler", "Euler"),
            ("Euler ancestral", "EulerAncestral"),
            ("DPM-Solver++ multistep, Karras sigmas", "DPMSolver++-Karras"),
            ("UniPC", "UniPC"),
            ("LCM", "LCM"),
            ("Heun (2 evaluations per step)", "Heun"),
            ("KDPM2 (2 evaluations per step)", "KDPM2"),
        )
    ),
    # -- composition
    Row(
        "enable_model_cpu_offload (before or after enable)",
        "yes",
        (f"{C}test_model_cpu_offload[offload-then-enable]", f"{C}test_model_cpu_offload[enable-then-offload]"),
    ),
    Row(
        "enable_sequential_cpu_offload (before or after enable)",
        "yes (simulated on CPU: accelerate hooks on every module; the real one runs when an accelerator is present)",
        (
            f"{C}test_sequential_offload_hooks_on_every_module[hooks-then-enable]",
            f"{C}test_sequential_offload_hooks_on_every_module[enable-then-hooks]",
            f"{C}test_real_sequential_cpu_offload_on_an_accelerator",
        ),
    ),
    Row("VAE slicing (`pipe.vae.enable_slicing()`; diffusers 0.42 pipelines dropped `enable_vae_slicing`)", "yes", (f"{C}test_vae_slicing",)),
    Row(
        "Attention processors (AttnProcessor, AttnProcessor2_0)",
        "yes",
        (f"{C}test_attention_processors[AttnProcessor]", f"{C}test_attention_processors[AttnProcessor2_0]"),
    ),
    Row(
        "FreeU (enable_freeu), also on AnimateDiff and text-to-video U-Nets",
        "yes",
        (
            f"{C}test_freeu",
            f"{H}test_freeu_in_place_scaling_does_not_corrupt_the_cache",
            f"{C}test_freeu_on_video_unets[AnimateDiffPipeline]",
            f"{C}test_freeu_on_video_unets[TextToVideoSDPipeline]",
        ),
    ),
    Row(
        "callback_on_step_end (editing latents) and interrupt",
        "yes",
        (f"{C}test_callback_on_step_end_that_edits_latents", f"{H}test_interrupt_then_next_call_is_fresh"),
    ),
    Row("num_images_per_prompt > 1", "yes", (f"{C}test_num_images_per_prompt",)),
    Row("guidance_scale <= 1 (no CFG batch)", "yes", (f"{C}test_no_classifier_free_guidance",)),
    Row("guidance_rescale", "yes", (f"{C}test_guidance_rescale",)),
    Row(
        "torch.Generator reproducibility (same seed, same image, twice in a row)",
        "yes",
        (f"{C}test_generator_reproducibility_with_a_stochastic_sampler", f"{H}test_same_call_twice_gives_the_same_image"),
    ),
)


NOTES: tuple[str, ...] = (
    (
        '`enable_sequential_cpu_offload(device="cpu")` fails inside accelerate on a CPU-only machine '
        "(torch 2.13, accelerate 1.15), with or without DeepCache; CPU CI installs accelerate's hooks on every "
        "module instead, and runs the real one where an accelerator is present."
    ),
    (
        "On retrieval steps a `ControlNetModel` runs only the layers whose residuals the shallow U-Net path "
        "consumes (its deeper down layers, mid block and their zero convolutions are skipped, except the mid block "
        "at the deepest branch, where its residual is added to the cached feature; the step's kind is "
        "decided once, before the ControlNet runs, and the U-Net keeps it); outputs stay bit-identical at every "
        "branch (`[*]`: every branch id). FLOPs for "
        "SD 1.5 at 512x512 with CFG: ControlNet 567 GFLOPs per step, 31 of them needed at branch 0 and 141 at "
        "branch 1 (ideal U-Net + ControlNet speedup at interval 3: 1.83x -> 2.62x at branch 0, 1.62x -> 2.05x at "
        "branch 1). Measured on the tiny CPU test pipeline (30 steps, I=3): 1.50x -> 2.32x (B=0), 1.35x -> 1.88x "
        "(B=1). Other ControlNet classes (union, XS, sparse) run in full, which is always correct."
    ),
)


def node_ids() -> list[str]:
    """Every test node id the table names (``name[prefix*]``: every parametrization whose id starts so)."""
    return [test for row in ROWS for test in row.tests]


def matches(node: str, collected: str) -> bool:
    """Whether table entry ``node`` names the collected test id ``collected``."""
    if node.endswith("*]"):
        return collected.startswith(node[:-2])
    return node == collected


def table() -> str:
    """The Markdown table (without the markers)."""
    lines = [
        "| Pipeline / feature | Supported | Tests |",
        "| --- | --- | --- |",
    ]
    for row in ROWS:
        tests = "<br>".join(f"`{t.removeprefix('tests/')}`" for t in row.tests)
        lines.append(f"| {row.feature} | {row.status} | {tests} |")
    return "\n".join(lines)


def section() -> str:
    """What README holds between the markers (markers included)."""
    return (
        f"{START}\n"
        "<!-- generated by `python -m tests.support_matrix` from tests/support_matrix.py; do not edit by hand -->\n"
        "Every row is backed by the named tests (in `tests/`); CPU, offline, tiny random models.\n\n"
        f"{table()}\n\n"
        + "".join(f"- {note}\n" for note in NOTES)
        + f"{END}"
    )


def readme_section(text: str) -> str | None:
    """README's current section between the markers (markers included), or None if absent."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start : end + len(END)]


def update_readme(path: Path = README) -> bool:
    """Rewrite the section in ``path`` (appending heading and markers if missing). True if it changed."""
    text = path.read_text() if path.exists() else ""
    current = readme_section(text)
    if current is None:
        new = text.rstrip("\n") + "\n\n## Supported pipelines and features\n\n" + section() + "\n"
    else:
        new = text.replace(current, section())
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update_readme()
    print(f"{README}: {'updated' if changed else 'already up to date'}")
    sys.exit(0)
