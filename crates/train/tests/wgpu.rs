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
