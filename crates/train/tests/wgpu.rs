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
