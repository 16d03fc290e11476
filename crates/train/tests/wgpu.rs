//! The contract suite on wgpu, compared with Flex.
//!
//! Runs only when `EFFORMER_WGPU_TESTS` is `on` (skip if no adapter) or `require` (fail if no
//! adapter), as `cargo xtask test` sets it; one test at a time (`--test-threads=1`): Mesa's
//! lavapipe is a software Vulkan driver and is not reliable under concurrent submissions.
//! It asks for the CPU (software) adapter explicitly, so it tests the same path on every machine.

#![cfg(feature = "wgpu")]

use burn::tensor::Device;

fn wgpu_cpu() -> Option<Device> {
    train::device::wgpu_test_device()
}

efficient_attn::contract_tests_against!(wgpu_cpu(), Device::flex(), 1e-4);

/// The CubeCL exact attention (`kernels::cube::flash`) against the composed tensor operations
/// on the same wgpu device: outputs and gradients of `full` and `memory-efficient`, with
/// padding, causality (with a memory) and cross attention.
#[test]
fn cube_flash_attention_equals_the_composed_attention_forward_and_backward() {
    use efficient_attn::testing::{check_fused_against_composed, fused_cases};
    use efficient_attn::{FullAttentionConfig, MemoryEfficientAttentionConfig};
    let Some(device) = wgpu_cpu() else {
        efficient_attn::testing::skipped(
            "cube_flash_attention_equals_the_composed_attention_forward_and_backward",
            "no wgpu adapter (EFFORMER_WGPU_TESTS unset or no CPU adapter)",
        );
        return;
    };
    for case in fused_cases() {
        check_fused_against_composed(FullAttentionConfig::default().into(), &case, &device);
        check_fused_against_composed(
            MemoryEfficientAttentionConfig::default().into(),
            &case,
            &device,
        );
    }
}

/// The CubeCL kernel attention (`kernels::cube::linear`) against the composed prefix sums on
/// the same wgpu device: on features (bidirectional, cross lengths, causal with ragged chunks
/// and a key prefix), with `φ = elu + 1` and key padding inside, and the Linear Transformer in
/// every mode; outputs and gradients.
#[test]
fn cube_kernel_attention_equals_the_composed_prefix_sums_forward_and_backward() {
    use efficient_attn::LinearTransformerAttentionConfig;
    use efficient_attn::testing::{
        check_elu_kernel_attention_against_composed, check_fused_against_composed,
        check_kernel_attention_against_composed, fused_cases,
    };
    let Some(device) = wgpu_cpu() else {
        efficient_attn::testing::skipped(
            "cube_kernel_attention_equals_the_composed_prefix_sums_forward_and_backward",
            "no wgpu adapter (EFFORMER_WGPU_TESTS unset or no CPU adapter)",
        );
        return;
    };
    check_kernel_attention_against_composed(&device);
    check_elu_kernel_attention_against_composed(&device);
    for case in fused_cases() {
        check_fused_against_composed(
            LinearTransformerAttentionConfig { chunk: 5 }.into(),
            &case,
            &device,
        );
    }
}

/// The CubeCL block-sparse attention (`kernels::cube::block_sparse`) against the gathered
/// composition on the same wgpu device: windows with a band, causal blocks, per-head random
/// blocks with masked global keys and padding, cross lengths, an explicit mask, steep scores,
/// and permuted rows by their original positions with the self score and the row
/// log-sum-exp; outputs and every gradient.
#[test]
fn cube_block_sparse_attention_equals_the_gathered_composition_forward_and_backward() {
    use efficient_attn::testing::{
        check_block_sparse_against_composed, check_block_sparse_with_steep_scores,
        check_positions_against_composed,
    };
    let Some(device) = wgpu_cpu() else {
        efficient_attn::testing::skipped(
            "cube_block_sparse_attention_equals_the_gathered_composition_forward_and_backward",
            "no wgpu adapter (EFFORMER_WGPU_TESTS unset or no CPU adapter)",
        );
        return;
    };
    check_block_sparse_against_composed(&device);
    check_block_sparse_with_steep_scores(&device);
    check_positions_against_composed(&device);
}
